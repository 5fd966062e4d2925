"""The sharded model equals the single-device model: forward, loss, gradients and train steps.

Eight emulated CPU devices (tests/conftest.py). Each mesh runs the tiny V3 (MLA, group-limited
sigmoid MoE, MTP) in fp32 under its rules preset: the MoE takes the expert-parallel shard_map
path (all-to-all over `expert`), the single-device reference the dropless path. Tolerances are
the pinned whole-model fp32 ones (deepseek_jax.testing.MODEL_FP32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig, total_loss
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.moe.expert_parallel import global_expert_load
from deepseek_jax.moe.router import RoutingBias
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.parallel import ONE_DEVICE, ParallelConfig
from deepseek_jax.sharding.rules import batch_sharding, get_rules, param_shardings
from deepseek_jax.testing import MODEL_FP32, assert_close
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state, make_train_step, train_state_shardings

B, T = 8, 8
# (name, mesh, MoE exchange under the mesh). None = ParallelConfig.create's default: the
# expert-parallel path with the dropless exchange the backend has (on CPU the all-gather
# emulation of ragged_all_to_all); "capacity" = fixed all-to-all buffers, large enough here that
# nothing is dropped.
MESHES = [
    ("dp8", MeshConfig(data=8, fsdp=1, rules="dp"), None),
    ("fsdp2_ep4", MeshConfig(fsdp=2, expert=4, rules="fsdp_ep"), None),
    ("dp2_ep2_tp2", MeshConfig(data=2, fsdp=1, expert=2, tensor=2, rules="ep_tp"), None),
    ("ep8_capacity", MeshConfig(fsdp=1, expert=8, rules="fsdp_ep"), "capacity"),
    ("fsdp2_ep2_tp2", MeshConfig(fsdp=2, expert=2, tensor=2, rules="fsdp_ep_tp"), None),
]
# Training runs on the mesh that combines everything (FSDP + EP + TP); compiles dominate.
TRAIN_MESHES = [MESHES[-1]]
TRAIN_STEPS = 3


@pytest.fixture(scope="module")
def setup():
    """The tiny V3 with MTP (train-step test) and, for the mesh sweep, without its MTP module.

    Dropping MTP from the sweep saves a third of each compile; the MTP block is the same Block
    class under the same scan, and the train-step test keeps it.
    """
    # capacity_factor matters only to the "capacity" exchange: 4 = P min(K, E/P) / K on the
    # 8-way expert mesh, so no destination device can overflow.
    cfg = load_preset("v3-tiny").replace(capacity_factor=4.0)
    tcfg = TrainConfig(steps=10, lr=1e-2, schedule="constant", warmup_steps=0, tensorboard=False)
    graphdef, state = init_train_state(cfg, tcfg, seed=0)
    ids = jax.random.randint(jax.random.key(1), (TRAIN_STEPS, B, T + 1), 0, cfg.vocab_size)
    batches = [{"input_ids": i[:, :-1], "labels": i[:, 1:]} for i in ids]
    return cfg, tcfg, graphdef, state, batches


@pytest.fixture(scope="module")
def sweep(setup):
    cfg, _, _, state, batches = setup
    cfg = cfg.replace(num_nextn_predict_layers=0)
    abstract = nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract, nnx.Param, RoutingBias, ...)[0]
    drop = lambda tree: {k: v for k, v in tree.items() if k != "mtp"}  # same values otherwise
    args = (drop(state.params), drop(state.biases), drop(state.other), batches[0])
    return cfg, graphdef, nnx.state(abstract, nnx.Param), args


def _forward_backward(cfg, graphdef, parallel):
    def fn(params, biases, other, batch):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, biases, other).replace_parallel(parallel)
            out = model(batch["input_ids"])
            loss, _ = total_loss(out, batch, cfg, LossConfig())
            return loss, (out.logits, global_expert_load(out.moe_stats.expert_counts, parallel))

        (loss, (logits, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logits, load, grads

    return fn


@pytest.fixture(scope="module")
def reference(sweep):
    cfg, graphdef, _, args = sweep
    fn = jax.jit(_forward_backward(cfg, graphdef, ONE_DEVICE))  # v3-tiny: dropless
    return fn(*args)


def _max_err(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.abs(x - y).max()) for x, y in pairs)


@pytest.mark.parametrize("name,mesh_cfg,exchange", MESHES, ids=[m[0] for m in MESHES])
def test_sharded_forward_loss_grads_equal_single_device(sweep, reference, name, mesh_cfg, exchange):
    cfg, graphdef, abstract_params, args = sweep
    mesh = make_mesh(mesh_cfg)
    rules = get_rules(mesh_cfg.rules)
    parallel = ParallelConfig.create(cfg.moe_impl, mesh, rules, exchange=exchange)
    assert parallel.exchange == exchange or (exchange is None and parallel.expert_parallel)
    p_sh = nnx.to_pure_dict(param_shardings(abstract_params, mesh, rules))
    fn = jax.jit(
        _forward_backward(cfg, graphdef, parallel),
        in_shardings=(p_sh, None, None, batch_sharding(mesh, rules)),
        out_shardings=(None, None, None, p_sh),
    )
    loss, logits, load, grads = fn(*args)
    ref_loss, ref_logits, ref_load, ref_grads = reference
    # The gradients come back sharded as the rules say (experts over `expert`, ...).
    w_up = grads["moe_layers"]["ffn"]["w_up"]
    assert w_up.sharding.spec == p_sh["moe_layers"]["ffn"]["w_up"].spec
    assert_close(logits, ref_logits, **MODEL_FP32)
    assert_close(loss, ref_loss, **MODEL_FP32)
    # Expert loads summed over the whole mesh equal the single-device ones, exactly.
    np.testing.assert_array_equal(np.asarray(load), np.asarray(ref_load))
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert_close(g, r, **MODEL_FP32, err_msg=jax.tree_util.keystr(path))
    print(
        f"\n{name}: max|d logits| {_max_err(logits, ref_logits):.2e}  |d loss| "
        f"{abs(float(loss - ref_loss)):.2e}  max|d grad| {_max_err(grads, ref_grads):.2e}"
    )


def _train(cfg, tcfg, graphdef, state, batches, mesh=None, rules=None):
    step = make_train_step(cfg, LossConfig(), tcfg, graphdef, mesh=mesh, rules=rules, donate=False)
    if mesh is not None:
        state = jax.device_put(state, train_state_shardings(cfg, tcfg, mesh, rules))
    compiled = step.lower(state, batches[0]).compile()
    losses = []
    for batch in batches:
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def reference_training(setup):
    return _train(*setup)


@pytest.mark.parametrize("name,mesh_cfg,exchange", TRAIN_MESHES, ids=[m[0] for m in TRAIN_MESHES])
def test_sharded_training_steps_equal_single_device(
    setup, reference_training, name, mesh_cfg, exchange
):
    del exchange  # the train step derives its ParallelConfig from the mesh and rules
    mesh = make_mesh(mesh_cfg)
    rules = get_rules(mesh_cfg.rules)
    losses, state = _train(*setup, mesh=mesh, rules=rules)
    ref_losses, ref_state = reference_training
    assert_close(losses, ref_losses, **MODEL_FP32)
    assert not np.allclose(losses[0], losses[-1])  # the steps did train
    # Routing biases were updated from the global expert loads, identically.
    jax.tree.map(lambda a, b: assert_close(a, b, **MODEL_FP32), state.biases, ref_state.biases)
    assert float(jnp.abs(state.biases["moe_layers"]["ffn"]["router"]["bias"]).max()) > 0
    print(f"\n{name}: losses {losses}, max|d loss| {np.abs(losses - ref_losses).max():.2e}")


def test_model_runs_its_own_parallel_config_wherever_it_is_called(setup):
    """model(ids) traces the same program inside or outside a context mesh: only the model's
    ParallelConfig decides constraints and the expert-parallel exchange."""
    cfg = setup[0].replace(num_nextn_predict_layers=0)
    mesh_cfg = MESHES[1][1]  # fsdp2_ep4
    mesh, rules = make_mesh(mesh_cfg), get_rules(mesh_cfg.rules)
    parallel = ParallelConfig.create(cfg.moe_impl, mesh, rules)
    model = nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0), parallel=parallel))
    assert model.parallel is parallel
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def program(m):
        """Counts of the parallel primitives in the traced forward pass."""
        text = str(jax.make_jaxpr(lambda m, ids: m(ids).logits)(m, ids))
        return {p: text.count(p) for p in ("shard_map", "sharding_constraint", "all_gather")}

    sharded = program(model)
    with jax.set_mesh(mesh):
        assert program(model) == sharded
    assert sharded["shard_map"] > 0 and sharded["sharding_constraint"] > 0
    local = program(model.replace_parallel(ONE_DEVICE))
    assert model.parallel is parallel  # replace_parallel returned a new model
    assert local == dict.fromkeys(local, 0)
    with jax.set_mesh(mesh):
        assert program(model.replace_parallel(ONE_DEVICE)) == local
