"""Grouped expert GEMM: xla (ragged_dot) and Pallas backends vs the one-hot references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels import grouped_matmul as gm
from deepseek_jax.kernels import quant
from deepseek_jax.kernels.backend import BlockSizes
from deepseek_jax.kernels.pallas_grouped_matmul import group_metadata
from deepseek_jax.testing import assert_close

IMPLS = ["xla", "pallas"]
# 32-row tiles: groups straddle tile boundaries, and rows past the total share a tile with a group.
TILES = BlockSizes(block_m=32, block_n=64, block_k=128)
FP8_VS_EXACT = 2.0**-3  # see test_fp8_matmul.py

# (M, group_sizes): zero-size groups, sum < M, leading empties, one group, all empty.
GROUPS = {
    "holes": (50, [10, 0, 25, 8]),
    "lead0": (64, [0, 0, 40, 24]),
    "one": (33, [33]),
    "empty": (20, [0, 0, 0]),
}


def _normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _case(name, k=200, n=72, dtype=jnp.float32):
    m, sizes = GROUPS[name]
    gs = jnp.asarray(sizes, jnp.int32)
    return _normal((m, k), 0, dtype), _normal((len(sizes), k, n), 1, dtype), gs


def _compiled(f, *args):
    """f(*args) as one jit (compile-bound: the suite compiles at LLVM level 0, tests/conftest)."""
    return jax.jit(f)(*args)


def _vjp(f, x, w, dy):
    """(f(x, w), dx, dw), compiled as one program."""

    def run(x, w, dy):
        y, pullback = jax.vjp(f, x, w)
        return (y, *pullback(dy))

    return _compiled(run, x, w, dy)


def test_group_metadata_maps_tiles_to_groups():
    # Groups own rows [0,10) [10,10) [10,35) [35,43); rows 43..49 belong to none.
    meta = group_metadata(jnp.asarray([10, 0, 25, 8], jnp.int32), num_rows=64, block_m=16)
    np.testing.assert_array_equal(meta.offsets, [0, 10, 10, 35, 43])
    np.testing.assert_array_equal(meta.tile_first, [0, 2, 2, 4])
    # Tile 3 (rows 48..63) is past the total: an empty group range.
    np.testing.assert_array_equal(meta.tile_last, [2, 2, 3, 3])


def test_references_agree_with_a_per_group_loop():
    x, w, gs = _case("holes", k=20, n=6)
    dy = _normal((50, 6), 2)
    out, dw = gm.reference(x, w, gs), gm.transposed_reference(x, dy, gs)
    xn, wn, dyn = np.asarray(x), np.asarray(w), np.asarray(dy)
    bounds = np.concatenate([[0], np.cumsum(np.asarray(gs))])
    for g in range(4):
        rows = slice(bounds[g], bounds[g + 1])
        assert_close(out[rows], xn[rows] @ wn[g], jnp.float32)
        assert_close(dw[g], xn[rows].T @ dyn[rows], jnp.float32)
    np.testing.assert_array_equal(np.asarray(out)[43:], 0.0)
    np.testing.assert_array_equal(np.asarray(dw[1]), 0.0)  # empty group


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(GROUPS))
def test_grouped_matmul_forward_and_vjp(impl, name):
    x, w, gs = _case(name)
    dy = _normal((x.shape[0], w.shape[2]), 2)
    got = _vjp(lambda a, b: gm.grouped_matmul(a, b, gs, impl=impl, block_sizes=TILES), x, w, dy)
    want = _vjp(lambda a, b: gm.reference(a, b, gs), x, w, dy)
    for g, r in zip(got, want, strict=True):
        chex.assert_equal_shape([g, r])
        assert_close(g, r, jnp.float32)
    total = int(jnp.sum(gs))
    np.testing.assert_array_equal(np.asarray(got[0])[total:], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_matmul_bf16(impl):
    x, w, gs = _case("holes", k=130, n=40, dtype=jnp.bfloat16)
    dy = _normal((50, 40), 3, jnp.bfloat16)
    got = _vjp(lambda a, b: gm.grouped_matmul(a, b, gs, impl=impl, block_sizes=TILES), x, w, dy)
    want = _vjp(lambda a, b: gm.reference(a, b, gs), x, w, dy)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert_close(g, r, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_matches_transposed_reference(impl):
    x, _, gs = _case("holes", k=72)
    dy = _normal((50, 48), 4)
    out, ref = _compiled(
        lambda x, dy: (
            gm.tgmm(x, dy, gs, impl=impl, block_sizes=BlockSizes(16, 32, 16)),
            gm.transposed_reference(x, dy, gs),
        ),
        x,
        dy,
    )
    chex.assert_shape(out, (4, 72, 48))
    assert_close(out, ref, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_scaled_gmm_matches_dequantized_reference(impl):
    # Power-of-two scales: dequantization is exact, so only fp32 summation order differs.
    x, w, gs = _case("holes", k=300, n=72)
    xq, xs = quant.quantize_activation(x, power_of_two_scale=True)
    wq, ws = quant.quantize_weight(w, power_of_two_scale=True)
    kw = dict(out_dtype=jnp.float32, impl=impl, block_sizes=TILES)
    out, ref = _compiled(
        lambda xq, xs, wq, ws: (
            gm.gmm(xq, wq, gs, x_scale=xs, w_scale=ws, **kw),
            gm.reference(quant.dequantize_activation(xq, xs), quant.dequantize_weight(wq, ws), gs),
        ),
        *(xq, xs, wq, ws),
    )
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["holes", "empty"])
def test_grouped_matmul_fp8_forward_and_vjp(impl, name):
    x, w, gs = _case(name, k=160, n=40)
    dy = _normal((x.shape[0], 40), 5)
    kw = dict(power_of_two_scale=True)
    got = _vjp(
        lambda a, b: gm.grouped_matmul_fp8(a, b, gs, impl=impl, block_sizes=TILES, **kw), x, w, dy
    )
    want = _vjp(lambda a, b: gm.grouped_matmul_fp8_reference(a, b, gs, **kw), x, w, dy)
    for g, r in zip(got, want, strict=True):
        chex.assert_equal_shape([g, r])
        assert_close(g, r, jnp.float32)


def test_grouped_matmul_fp8_bf16_pallas():
    # bf16 operands through the default tiles (the xla path sees bf16 in test_v3_sized_dims).
    x, w, gs = _case("holes", k=256, n=32, dtype=jnp.bfloat16)
    dy = _normal((50, 32), 6, jnp.bfloat16)
    got = _vjp(lambda a, b: gm.grouped_matmul_fp8(a, b, gs, impl="pallas"), x, w, dy)
    want = _vjp(lambda a, b: gm.grouped_matmul_fp8_reference(a, b, gs), x, w, dy)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert_close(g, r, jnp.bfloat16)


def test_grouped_matmul_fp8_is_close_to_exact_math():
    x, w, gs = _case("holes", k=256, n=64)
    dy = _normal((50, 64), 7)
    got = _vjp(lambda a, b: gm.grouped_matmul_fp8(a, b, gs, impl="xla"), x, w, dy)
    exact = _vjp(lambda a, b: gm.reference(a, b, gs), x, w, dy)
    for g, r in zip(got, exact, strict=True):
        r = np.asarray(r)
        # dw of the empty expert is exactly zero in both; compare the rest.
        mask = np.ones(r.shape, bool) if r.ndim == 2 else np.any(r != 0, axis=(1, 2))
        err = np.linalg.norm(np.asarray(g)[mask] - r[mask]) / np.linalg.norm(r[mask])
        assert err < FP8_VS_EXACT


def test_v3_sized_dims_on_xla():
    # d_model 7168 -> 256 over 4 experts; the fp8 and bf16 variants both on the xla path.
    m, sizes = 24, [9, 0, 7, 4]
    gs = jnp.asarray(sizes, jnp.int32)
    x, w = _normal((m, 7168), 8, jnp.bfloat16), _normal((4, 7168, 256), 9, jnp.bfloat16)
    out, ref, out_fp8, ref_fp8 = _compiled(
        lambda x, w: (
            gm.grouped_matmul(x, w, gs, impl="xla"),
            gm.reference(x, w, gs),
            gm.grouped_matmul_fp8(x, w, gs, impl="xla"),
            gm.grouped_matmul_fp8_reference(x, w, gs),
        ),
        x,
        w,
    )
    assert_close(out, ref, jnp.bfloat16)
    assert_close(out_fp8, ref_fp8, jnp.bfloat16)


def test_errors():
    x, w, gs = _case("holes", k=64, n=16)
    with pytest.raises(ValueError, match="group_sizes"):
        gm.grouped_matmul(x, w, gs[:3])
    with pytest.raises(ValueError, match="k=64"):
        gm.gmm(x, w[:, :32], gs)
    with pytest.raises(TypeError, match="x.dtype"):
        gm.gmm(x, w.astype(jnp.bfloat16), gs)
    with pytest.raises(ValueError, match="both x_scale and w_scale"):
        gm.gmm(x, w, gs, x_scale=jnp.ones((50, 1)))
    with pytest.raises(NotImplementedError, match="pallas"):
        gm.gmm(x, w, gs, impl="triton")
