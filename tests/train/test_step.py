"""The train step: NaN/Inf skipping, gradient accumulation, bias update and its schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.rules import get_rules
from deepseek_jax.testing import MODEL_FP32
from deepseek_jax.train import step as step_module
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state, make_train_step, update_biases

B, T = 4, 16


def _batch(cfg, seed=0):
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "loss_mask": np.ones((B, T), np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    }


def _tcfg(**kw):
    # gamma stops after 2 steps' tokens, the MTP weight switches after 1 step's.
    return TrainConfig(
        steps=10,
        lr=1e-2,
        warmup_steps=0,
        schedule="constant",
        bias_update_speed=0.01,
        bias_update_stop_tokens=2 * B * T,
        mtp_lambda_late=0.1,
        mtp_lambda_switch_tokens=B * T,
        **kw,
    )


@pytest.fixture(scope="module")
def setup():
    # One MoE layer (no dense layer) and the MTP block: every path of the step, less to compile.
    cfg = load_preset("v3-tiny").replace(num_hidden_layers=1, first_k_dense_replace=0, remat="none")
    graphdef, state = init_train_state(cfg, _tcfg(), seed=0)
    step = make_train_step(cfg, LossConfig(), _tcfg(), graphdef, donate=False)
    return cfg, graphdef, state, step


def test_non_finite_step_is_skipped(setup):
    cfg, _, state, step = setup
    bad = _batch(cfg)
    bad["labels"][0, 3] = cfg.vocab_size  # out of range: the picked logit is NaN
    new, m = step(state, bad)
    assert not np.isfinite(float(m["loss"])) and float(m["finite"]) == 0.0
    assert int(new.skipped) == 1 and int(new.step) == 1
    chex.assert_trees_all_equal(
        (new.params, new.opt_state, new.biases), (state.params, state.opt_state, state.biases)
    )
    # The next good step trains normally with the first learning-rate value (no update yet).
    newer, m = step(new, _batch(cfg))
    assert float(m["finite"]) == 1.0 and int(newer.skipped) == 1 and int(newer.step) == 2
    assert float(m["lr"]) == pytest.approx(1e-2)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), newer.params, state.params)
    assert all(jax.tree.leaves(changed))


def test_bias_update_and_schedules(setup):
    cfg, _, state, step = setup
    gammas, lambdas, biases = [], [], [state.biases]
    for i in range(3):
        state, m = step(state, _batch(cfg, seed=i))
        gammas.append(float(m["bias_update_speed"]))
        lambdas.append(float(m["mtp_lambda"]))
        biases.append(state.biases)
        assert m["expert_load_max"].shape == (cfg.num_moe_layers + 1,)  # MoE layer + MTP block
        load = np.asarray(m["expert_load"])  # [L, E] each expert's share of its layer
        assert load.shape == (cfg.num_moe_layers + 1, cfg.n_routed_experts)
        np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(
            load.max(-1) * cfg.n_routed_experts, m["expert_load_max"], rtol=1e-6
        )
    np.testing.assert_allclose(gammas, [0.01, 0.01, 0.0])
    np.testing.assert_allclose(lambdas, [0.3, 0.1, 0.1])
    moved = [
        float(
            jnp.abs(
                a["moe_layers"]["ffn"]["router"]["bias"] - b["moe_layers"]["ffn"]["router"]["bias"]
            ).max()
        )
        for a, b in zip(biases[:-1], biases[1:], strict=True)
    ]
    assert moved[0] == pytest.approx(0.01) and moved[2] == 0.0  # sign steps of gamma, then frozen


def test_update_biases_applies_the_model_update(setup):
    cfg, graphdef, state, _ = setup
    counts = jax.random.uniform(jax.random.key(0), (cfg.num_moe_layers + 1, cfg.n_routed_experts))
    new = update_biases(graphdef, state, counts, 0.5)
    old = state.biases
    for stack, rows in (("moe_layers", slice(0, cfg.num_moe_layers)), ("mtp", slice(-1, None))):
        b = (new[stack] if stack == "moe_layers" else new[stack]["block"])["ffn"]["router"]["bias"]
        o = (old[stack] if stack == "moe_layers" else old[stack]["block"])["ffn"]["router"]["bias"]
        c = np.asarray(counts[rows])
        want = o + 0.5 * np.sign(c.mean(-1, keepdims=True) - c)  # V3 Sec. 2.1.2
        np.testing.assert_allclose(b, want, rtol=1e-6)


def test_gradient_accumulation_matches_full_batch(setup):
    cfg, graphdef, state, step = setup
    step2 = make_train_step(cfg, LossConfig(), _tcfg(grad_accum=2), graphdef, donate=False)
    batch = _batch(cfg, seed=5)
    full, m1 = step(state, batch)
    accum, m2 = step2(state, batch)
    for key in ("loss", "main_loss", "mtp_loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(m2[key], m1[key], **MODEL_FP32)
    chex.assert_trees_all_close(accum.params, full.params, **MODEL_FP32)
    chex.assert_trees_all_close(accum.biases, full.biases)


def test_init_is_sharded_and_independent_of_the_mesh(setup):
    cfg, _, state, _ = setup
    mesh = make_mesh(MeshConfig(fsdp=8, rules="fsdp"))
    _, sharded = init_train_state(cfg, _tcfg(), seed=0, mesh=mesh, rules=get_rules("fsdp"))
    # Created in place: the embed dim of every weight split over fsdp, Adam's moments alike.
    assert sharded.params["embed"].sharding.spec == P(None, "fsdp")
    assert sharded.params["moe_layers"]["ffn"]["w_up"].sharding.spec == P(None, None, "fsdp", None)
    for name in ("mu", "nu"):
        moment = optax.tree.get(sharded.opt_state, name)["embed"]
        assert moment.sharding.spec == P(None, "fsdp")
    assert sharded.biases["moe_layers"]["ffn"]["router"]["bias"].sharding.is_fully_replicated
    # The same seed gives the same values, sharded or not.
    chex.assert_trees_all_equal(jax.device_get(sharded), jax.device_get(state))


def test_init_takes_the_seed_as_an_argument(setup):
    cfg, _, state, _ = setup
    _, other = init_train_state(cfg, _tcfg(), seed=1)
    # A seed is the key of the Python int (what the model's own nnx.Rngs(seed) draws: eagerly,
    # so to an ulp of the initialiser's compiled erf_inv) ...
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(other.params["embed"], model.embed[...], rtol=1e-6, atol=0)
    assert not np.array_equal(other.params["embed"], state.params["embed"])
    # ... and an argument of one compiled initialiser, not a constant in its program: every seed
    # of a sweep shares the compile (and the persistent compilation cache entry).
    hlo = [
        jax.jit(lambda s: step_module._create(cfg, optax.sgd(0.1), s)).lower(seed).as_text()
        for seed in (step_module._seed_array(0), step_module._seed_array(12345))
    ]
    assert hlo[0] == hlo[1]
    with pytest.raises(ValueError, match="seed=4294967296 must fit in int32"):
        init_train_state(cfg, _tcfg(), seed=2**32)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_all_finite_equals_the_plain_check(bad):
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [np.float32(2.0)]}
    tree["c"] = rng.normal(size=(5,)).astype(jnp.bfloat16)
    tree["i"] = np.array([1, 2], np.int32)  # integer leaves are not checked
    for path in ("a", "c"):
        t = jax.tree.map(np.copy, tree)
        if bad is not None:
            t[path].flat[1] = bad
        plain = all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(t))
        assert bool(jax.jit(step_module.all_finite)(t)) == plain == (bad is None)
    assert bool(step_module.all_finite({"i": tree["i"]}))


def test_finiteness_check_is_computed_once(setup):
    """The skip decision is one value that the per-leaf selects read, not an expression that the
    compiler copies into each of them (as a chain of `and`s it was: 3.5x the HLO instructions,
    twice the step's compile time on CPU)."""
    cfg, _, state, step = setup
    leaves = [x for x in jax.tree.leaves((state.params, state.opt_state)) if x.dtype.kind == "f"]
    hlo = step.lower(state, _batch(cfg)).compile().as_text()
    # One is-finite per state leaf, loss and gradient norm (a fusion may split one in two);
    # copied into every select there are over 3x as many.
    assert hlo.count("is-finite(") <= 2 * (len(leaves) + 2), (hlo.count("is-finite("), len(leaves))
