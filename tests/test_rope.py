"""RoPE and YaRN against hand-written formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import RopeScaling, load_preset
from deepseek_jax.rope import apply_rope, cos_sin_scale, inv_frequencies, rope_tables
from deepseek_jax.testing import assert_close


def yarn_numpy(dim, base, factor, orig, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023, eq. 17-19) as DeepSeek's reference code writes it, per dim."""
    out = []

    def corr(rot):  # dim index that makes `rot` full turns over the original context
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep, 1: interpolate
        out.append(theta * (1 - ramp) + theta / factor * ramp)
    return np.array(out)


@pytest.mark.parametrize(
    "dim, base, factor, orig",
    [(64, 10000.0, 40.0, 4096), (8, 10000.0, 4.0, 64), (128, 500000.0, 8.0, 8192)],
)
def test_yarn_frequencies_match_formula(dim, base, factor, orig):
    got = inv_frequencies(dim, base, RopeScaling(factor, orig))
    np.testing.assert_allclose(got, yarn_numpy(dim, base, factor, orig, 32, 1), rtol=1e-6)
    # High-frequency dims are extrapolated (unchanged), the lowest interpolated by 1/factor.
    plain = inv_frequencies(dim, base, None)
    assert got[0] == pytest.approx(plain[0])
    assert got[-1] == pytest.approx(plain[-1] / factor, rel=1e-6)


def test_yarn_mscale_on_cos_sin_and_softmax():
    rs = RopeScaling(40, 4096, mscale=0.707, mscale_all_dim=0.707)
    assert cos_sin_scale(rs) == pytest.approx(1.0)
    rs = RopeScaling(40, 4096, mscale=1.0, mscale_all_dim=0.0)
    assert cos_sin_scale(rs) == pytest.approx(0.1 * math.log(40) + 1)
    cfg = load_preset("deepseek-v2-236b")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(m * m / math.sqrt(192))


def test_interleaved_equals_half_split_after_permutation(key):
    cfg = load_preset("v3-tiny")
    R = cfg.qk_rope_head_dim
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3, R)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cos, sin = rope_tables(cfg, pos)
    inter = apply_rope(x, cos, sin, interleaved=True)
    perm = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])  # pairs -> halves
    half = apply_rope(x[..., perm], cos, sin, interleaved=False)
    assert_close(inter[..., perm], half)


def test_rope_is_a_rotation_by_position_difference():
    """q.k after RoPE depends only on the position difference (relative encoding)."""
    cfg = load_preset("v3-tiny").replace(rope_scaling=None)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, cfg.qk_rope_head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, cfg.qk_rope_head_dim)), jnp.float32)

    def dot(pq, pk):
        cq, sq = rope_tables(cfg, jnp.array([[pq]]))
        ck, sk = rope_tables(cfg, jnp.array([[pk]]))
        return float(
            (
                apply_rope(q, cq, sq, interleaved=True) * apply_rope(k, ck, sk, interleaved=True)
            ).sum()
        )

    assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-5)
    # Hand rotation of the first pair at position p: angle = p * theta_0 = p.
    cq, sq = rope_tables(cfg, jnp.array([[3]]))
    rot = apply_rope(q, cq, sq, interleaved=True)
    a, b = float(q[0, 0, 0]), float(q[0, 0, 1])
    assert float(rot[0, 0, 0]) == pytest.approx(a * math.cos(3) - b * math.sin(3), rel=1e-5)
    assert float(rot[0, 0, 1]) == pytest.approx(b * math.cos(3) + a * math.sin(3), rel=1e-5)
