"""Meshes, the logical-axis rules table, and activation constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import load_preset
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.sharding.logical import activation_spec, constrain
from deepseek_jax.sharding.mesh import AXES, MeshConfig, abstract_mesh, make_mesh, parse_mesh
from deepseek_jax.sharding.parallel import ONE_DEVICE, ParallelConfig
from deepseek_jax.sharding.rules import (
    RULE_PRESETS,
    batch_spec,
    get_rules,
    param_shardings,
    spec_for,
    state_specs,
)

BATCH = ("data", "fsdp", "expert")


@pytest.fixture(scope="module")
def abstract_params():
    model = nnx.eval_shape(lambda: DeepSeekModel(load_preset("v3-tiny"), rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def _specs(params, rules, **sizes):
    mesh_sizes = dict.fromkeys(AXES, 1) | sizes
    return nnx.to_pure_dict(state_specs(params, get_rules(rules), mesh_sizes))


# ---- meshes -------------------------------------------------------------------------------
def test_make_mesh_has_all_axes_with_auto_types():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, expert=2, tensor=1, rules="fsdp_ep"))
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1, "stage": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert mesh.devices.size == len(jax.devices())


def test_mesh_config_validation_names_the_field():
    with pytest.raises(ValueError, match="MeshConfig.rules='nope'"):
        MeshConfig(rules="nope")
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.expert=0"):
        MeshConfig(expert=0)
    with pytest.raises(ValueError, match="needs 16 devices, but 8"):
        MeshConfig(fsdp=4, expert=4).resolve(8)
    cfg = MeshConfig.from_string("expert=64, fsdp=32", rules="fsdp_ep")
    assert cfg.sizes_tuple() == (1, 32, 64, 1, 1)
    with pytest.raises(ValueError, match="axis=size"):
        MeshConfig.from_string("experts=4")
    # The converter's target mesh uses the same parser: named axes only.
    assert parse_mesh(" fsdp=8 ,data=1,") == {"fsdp": 8, "data": 1}
    with pytest.raises(ValueError, match="size of 'fsdp' must be an integer"):
        parse_mesh("fsdp=x")


def test_abstract_mesh_plans_2048_devices():
    mesh = abstract_mesh({"stage": 16, "expert": 64, "fsdp": 2})
    assert mesh.size == 2048 and mesh.axis_names == AXES
    with pytest.raises(ValueError, match="unknown axes"):
        abstract_mesh({"pipeline": 2})


# ---- rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(RULE_PRESETS))
def test_every_preset_shards_every_parameter(abstract_params, preset):
    specs = _specs(abstract_params, preset, data=1, fsdp=2, expert=2, tensor=2)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(jax.tree.leaves(abstract_params)) and all(
        isinstance(s, P) for s in leaves
    )
    w_up = specs["moe_layers"]["ffn"]["w_up"]  # [L, E, D, F]
    rules = RULE_PRESETS[preset]
    assert w_up[0] is None  # the scanned `layers` axis is never split
    assert w_up[1] == rules.get("experts")
    assert w_up[3] == rules.get("expert_mlp")


def test_fsdp_fallback_shards_weights_without_embed(abstract_params):
    specs = _specs(abstract_params, "fsdp_ep_tp", fsdp=2, expert=2, tensor=2)
    attn = specs["moe_layers"]["attn"]
    assert attn["wq_b"] == P(None, "fsdp", "tensor", None)  # [L, Q, N, H]: Q takes fsdp
    assert attn["wkv_b"] == P(None, "fsdp", "tensor", None)
    assert attn["wq_a"] == P(None, "fsdp", None)  # [L, D, Q]: embed -> fsdp, Q stays whole
    assert specs["moe_layers"]["ffn"]["w_down"] == P(None, "expert", "tensor", "fsdp")


def test_collision_is_rejected_naming_the_parameter(abstract_params):
    rules = {"batch": BATCH, "embed": "fsdp", "mlp": "fsdp"}
    with pytest.raises(ValueError, match=r"dense_layers/ffn/w_down: mesh axis 'fsdp' used twice"):
        state_specs(abstract_params, rules, dict.fromkeys(AXES, 1) | {"fsdp": 2})


def test_indivisible_dimension_is_rejected_naming_the_parameter(abstract_params):
    # d_model 64 does not split 3 ways.
    with pytest.raises(
        ValueError, match=r"attn/wkv_a: dimension 1 \('embed', size 64\).*total size 3"
    ):
        state_specs(abstract_params, get_rules("fsdp"), dict.fromkeys(AXES, 1) | {"fsdp": 3})
    with pytest.raises(ValueError, match="names no mesh axis"):
        spec_for("w", (4,), ("embed",), {"embed": "pipeline"}, dict.fromkeys(AXES, 1))


def test_v3_671b_parameters_shard_on_2048_devices():
    model = nnx.eval_shape(lambda: DeepSeekModel(load_preset("deepseek-v3-671b"), rngs=nnx.Rngs(0)))
    mesh = abstract_mesh({"fsdp": 32, "expert": 64})
    shardings = nnx.to_pure_dict(
        param_shardings(nnx.state(model, nnx.Param), mesh, get_rules("fsdp_ep"))
    )
    w_up = shardings["moe_layers"]["ffn"]["w_up"]
    assert w_up.spec == P(None, "expert", "fsdp", None)
    assert w_up.shard_shape((58, 256, 7168, 2048)) == (58, 4, 224, 2048)


def test_optimizer_state_leaves_get_their_parameters_shardings(abstract_params):
    mesh = make_mesh(MeshConfig(fsdp=2, expert=4, rules="fsdp_ep"))
    rules = get_rules("fsdp_ep")
    opt = optax.adamw(1e-3)
    # optax over an nnx.State keeps the Variables, so their metadata shards mu and nu.
    opt_state = jax.eval_shape(opt.init, abstract_params)
    sh = param_shardings(opt_state, mesh, rules)
    p_sh = param_shardings(abstract_params, mesh, rules)
    adam = sh[0]
    assert adam.count.spec == P()
    assert adam.mu["moe_layers"]["ffn"]["w_up"].spec == p_sh["moe_layers"]["ffn"]["w_up"].spec
    # Over a pure dict (the train state's params, no metadata) optax matches the moments to
    # their parameters, as RunShapes.shardings does.
    pure = nnx.to_pure_dict(abstract_params)
    pure_state = jax.eval_shape(opt.init, pure)
    replicated = NamedSharding(mesh, P())
    sh2 = optax.tree_map_params(
        opt,
        lambda _, s: s,
        pure_state,
        nnx.to_pure_dict(p_sh),
        transform_non_params=lambda _: replicated,
    )
    assert sh2[0].nu["moe_layers"]["ffn"]["w_up"].spec == P(None, "expert", "fsdp", None)
    assert sh2[0].count.spec == P()
    n_leaves = len(jax.tree.leaves(pure_state))
    assert len(jax.tree.leaves(sh2, is_leaf=lambda x: isinstance(x, NamedSharding))) == n_leaves


# ---- activations ----------------------------------------------------------------------------
def test_activation_spec_gives_the_batch_priority():
    fsdp = get_rules("fsdp_ep_tp")
    assert activation_spec(("batch", "seq", "embed"), fsdp) == P(BATCH, None, None)
    assert activation_spec(("batch", "seq", "heads"), fsdp) == P(BATCH, None, "tensor")
    assert batch_spec(fsdp, dict.fromkeys(AXES, 1)) == P(BATCH, None)


def test_constrain_is_identity_without_rules_and_shards_under_them():
    x = jnp.arange(8 * 4 * 2, dtype=jnp.float32).reshape(8, 4, 2)
    assert constrain(x, ("batch", "seq", "embed"), ONE_DEVICE) is x
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2, rules="fsdp_ep"))
    assert constrain(x, ("batch", "seq", "embed"), ParallelConfig(mesh)) is x  # no rules
    parallel = ParallelConfig(mesh, get_rules("fsdp_ep"))
    # no context mesh: the config's own mesh places the activation
    y = jax.jit(lambda v: constrain(v * 2, ("batch", "seq", "embed"), parallel))(x)
    with pytest.raises(ValueError, match="2 logical axes"):
        constrain(x, ("batch", "seq"), parallel)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(BATCH, None, None)), 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
