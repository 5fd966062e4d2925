"""DeepSeekMoE: dropless and capacity paths against the per-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.moe import MoE, expert_capacity, routed_capacity, routed_dropless
from deepseek_jax.moe.router import Routing
from deepseek_jax.testing import MODEL_FP32, assert_close


@pytest.fixture(scope="module")
def moe_and_x():
    cfg = load_preset("v3-tiny")
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 12, cfg.hidden_size))
    return cfg, moe, x


def per_token_numpy(x, r, wg, wu, wd):
    """Loop over tokens and their experts: the most literal reading of V3 eq. 12."""
    x, wg, wu, wd = map(np.asarray, (x, wg, wu, wd))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, g in zip(np.asarray(r.experts[t]), np.asarray(r.weights[t]), strict=True):
            h = x[t] @ wg[e]
            h = h / (1 + np.exp(-h)) * (x[t] @ wu[e])
            out[t] += g * (h @ wd[e])
    return out


def test_dropless_and_reference_match_per_token_loop(moe_and_x):
    cfg, moe, x = moe_and_x
    xf = x.reshape(-1, cfg.hidden_size)
    r = moe.router(xf)
    ws = (moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    expect = per_token_numpy(xf, r, *ws)
    assert_close(routed_dropless(xf, r, *ws), expect)
    out_ref, _ = moe(x, algorithm="reference")
    out_drop, _ = moe(x, algorithm="dropless")
    assert_close(out_drop, out_ref)


def test_capacity_equals_dropless_when_nothing_dropped(moe_and_x):
    cfg, moe, x = moe_and_x
    big = MoE(cfg.replace(capacity_factor=8.0), rngs=nnx.Rngs(1))  # same init seed as moe
    out_cap, stats = big(x, algorithm="capacity")
    out_drop, _ = moe(x, algorithm="dropless")
    assert float(stats.dropped) == 0.0
    assert_close(out_cap, out_drop)


def test_capacity_drops_lowest_affinity_first():
    # 4 tokens all routed to expert 0 (K=1) with capacity 2: the two highest weights survive.
    E, D, F = 2, 4, 3
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
    wg, wu, wd = (
        jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(E, D, F), (E, D, F), (E, F, D)]
    )
    w = jnp.array([[0.1], [0.9], [0.5], [0.7]])
    r = Routing(w, jnp.zeros((4, 1), jnp.int32), jnp.concatenate([w, 1 - w], 1))  # s = g
    out, keep = routed_capacity(x, r, wg, wu, wd, capacity=2)
    np.testing.assert_array_equal(np.asarray(keep[:, 0]), [False, True, False, True])
    full = routed_dropless(x, r, wg, wu, wd)
    assert_close(out[jnp.array([1, 3])], full[jnp.array([1, 3])])
    np.testing.assert_array_equal(np.asarray(out[jnp.array([0, 2])]), 0.0)


def test_capacity_reports_dropped_fraction(moe_and_x):
    cfg, _, x = moe_and_x
    small = MoE(cfg.replace(capacity_factor=0.5), rngs=nnx.Rngs(1))
    _, stats = small(x, algorithm="capacity")
    M, K = x.shape[0] * x.shape[1], cfg.num_experts_per_tok
    cap = expert_capacity(M, cfg.replace(capacity_factor=0.5))
    counts = np.asarray(stats.expert_counts.sum(0))
    expected = np.maximum(counts - cap, 0).sum() / (M * K)
    assert float(stats.dropped) == pytest.approx(expected)
    assert float(stats.dropped) > 0


def test_stats_are_consistent(moe_and_x):
    cfg, moe, x = moe_and_x
    _, s = moe(x)
    B, T = x.shape[:2]
    np.testing.assert_allclose(np.asarray(s.expert_counts.sum(-1)), T * cfg.num_experts_per_tok)
    np.testing.assert_allclose(np.asarray(s.score_sums.sum(-1)), T, rtol=1e-5)
    assert np.all(np.asarray(s.group_counts) <= T)
    assert np.all(np.asarray(s.group_counts.sum(-1)) <= T * cfg.topk_group)
    masked = moe(x, token_mask=jnp.arange(T)[None, :].repeat(B, 0) < 5)[1]
    np.testing.assert_allclose(np.asarray(masked.tokens), 5)


def test_gradients_match_reference(moe_and_x):
    cfg, moe, x = moe_and_x
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(p, impl):
        out, _ = nnx.merge(graphdef, p, rest)(x, algorithm=impl)
        return jnp.sum(out**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_drop, g_ref = grad(params, "dropless"), grad(params, "reference")
    for a, b in zip(jax.tree.leaves(g_drop), jax.tree.leaves(g_ref), strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        assert_close(a, b, **MODEL_FP32)
