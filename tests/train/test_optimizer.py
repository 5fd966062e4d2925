"""Learning-rate schedules against hand values; AdamW's decay mask; bf16 moments."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.optimizer import lr_schedule, make_optimizer, weight_decay_mask
from deepseek_jax.train.step import RunShapes


def _lr(tcfg, steps):
    fn = lr_schedule(tcfg)
    return [float(fn(s)) for s in steps]


@pytest.mark.parametrize(
    "schedule, points",
    [
        # warm-up (s + 1) / 10, then DeepSeek LLM's drops: x0.316 at 80, x0.1 at 90 of 100 steps.
        ("multistep", {0: 0.1, 4: 0.5, 9: 1.0, 50: 1.0, 79: 1.0, 80: 0.316, 89: 0.316, 90: 0.1}),
        # cosine from step 10 to 100 down to 0.1: half way (55) is 0.1 + 0.9 / 2.
        ("cosine", {4: 0.5, 9: 1.0, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
        # v3 with decay over [50, 90]: constant, cosine (half way at 70), then constant 0.1.
        ("v3", {5: 0.6, 20: 1.0, 50: 1.0, 70: 0.55, 90: 0.1, 99: 0.1}),
        ("constant", {3: 0.4, 50: 1.0, 99: 1.0}),
    ],
)
def test_schedules_match_hand_values(schedule, points):
    tcfg = TrainConfig(
        steps=100,
        lr=1.0,
        warmup_steps=10,
        schedule=schedule,
        min_lr_ratio=0.1,
        decay_start=0.5,
        decay_end=0.9,
    )
    np.testing.assert_allclose(_lr(tcfg, points), list(points.values()), rtol=1e-6, atol=1e-7)


def test_v3_defaults_follow_the_report():
    # 2.2e-4 after a 2K-step warm-up, constant, cosine to 2.2e-5 (V3 Sec. 4.2).
    tcfg = TrainConfig(steps=14800)
    lr = dict(
        zip(
            [0, 1999, 5000, 10000, 14300, 14799],
            _lr(tcfg, [0, 1999, 5000, 10000, 14300, 14799]),
            strict=True,
        )
    )
    np.testing.assert_allclose(lr[0], 2.2e-4 / 2000, rtol=1e-6)
    np.testing.assert_allclose([lr[1999], lr[5000], lr[10000]], [2.2e-4] * 3, rtol=1e-6)
    np.testing.assert_allclose([lr[14300], lr[14799]], [2.2e-5] * 2, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_shapes(tiny_cfg):
    return RunShapes.build(tiny_cfg, TrainConfig())


def _paths(tree):
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_decay_mask_excludes_norms_and_biases(tiny_shapes):
    mask = _paths(weight_decay_mask(tiny_shapes.params))
    assert mask == _paths(tiny_shapes.decay_mask)
    no_decay = {p for p, m in mask.items() if not m}
    norms = {p for p in mask if any(part.endswith("norm") for part in p.split("/"))}
    assert no_decay == norms  # every norm scale, stacked or not, and nothing else
    for p in ("norm/weight", "dense_layers/attn_norm/weight", "mtp/enorm/weight"):
        assert not mask[p]
    for p in ("embed", "lm_head", "moe_layers/ffn/w_gate", "moe_layers/ffn/router/weight"):
        assert mask[p]
    # The aux-loss-free routing bias is not a parameter: the optimizer never sees it.
    assert not any(p.endswith("bias") for p in mask)
    assert set(_paths(tiny_shapes.state.biases)) == {
        "moe_layers/ffn/router/bias",
        "mtp/block/ffn/router/bias",
    }


def test_zero_gradients_decay_only_masked_weights():
    tcfg = TrainConfig(steps=10, lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    params = {
        "norm": {"weight": jnp.ones(4)},
        "dense_layers": {"attn_norm": {"weight": jnp.ones((2, 4))}, "w_up": jnp.ones((2, 4, 3))},
        "embed": jnp.ones((8, 4)),
        "b": {"bias": jnp.ones((2, 4))},
    }
    decay = {
        "norm": {"weight": False},
        "dense_layers": {"attn_norm": {"weight": False}, "w_up": True},
        "embed": True,
        "b": {"bias": False},
    }
    opt = make_optimizer(tcfg, decay_mask=decay)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new["norm"], params["norm"])
    chex.assert_trees_all_close(
        new["dense_layers"]["attn_norm"], params["dense_layers"]["attn_norm"]
    )
    chex.assert_trees_all_close(new["b"], params["b"])
    decayed = 1.0 - 0.1 * 0.5  # p - lr * wd * p
    np.testing.assert_allclose(new["embed"], decayed, rtol=1e-6)
    np.testing.assert_allclose(new["dense_layers"]["w_up"], decayed, rtol=1e-6)


def test_bf16_first_moment():
    params = {"w": jnp.ones((4, 4))}
    state = make_optimizer(TrainConfig(mu_dtype="bfloat16"), decay_mask={"w": True}).init(params)
    mu = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (4, 4)]
    assert {x.dtype for x in mu} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # mu, nu
