"""FP8 block-scaled matmul and fp8_linear: backends vs the pure-jnp references, forward and VJP."""

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels import fp8_matmul as fm
from deepseek_jax.kernels import quant
from deepseek_jax.kernels.backend import BlockSizes
from deepseek_jax.testing import assert_close

IMPLS = ["xla", "pallas"]
# Small tiles so the interpreted Pallas grid has several programs per axis.
SMALL_TILES = BlockSizes(block_m=16, block_n=64, block_k=128)
# The FP8 pipeline against unquantized math: E4M3 keeps each operand within 2^-4 relative, so the
# relative Frobenius error of a product of two quantized operands stays below 2 * 2^-4 = 2^-3.
FP8_VS_EXACT = 2.0**-3


def _normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _quantized(m, k, n, seed=0, block=128, pow2=True):
    x, w = _normal((m, k), seed), _normal((k, n), seed + 1)
    xq, xs = quant.quantize_activation(x, block_size=block, power_of_two_scale=pow2)
    wq, ws = quant.quantize_weight(w, block_size=block, power_of_two_scale=pow2)
    return xq, xs, wq, ws


def _compiled(f, *args):
    """f(*args) as one jit (compile-bound: the suite compiles at LLVM level 0, tests/conftest)."""
    return jax.jit(f)(*args)


def _vjp(f, x, w, dy):
    """(f(x, w), dx, dw), compiled as one program."""

    def run(x, w, dy):
        y, pullback = jax.vjp(f, x, w)
        return (y, *pullback(dy))

    return _compiled(run, x, w, dy)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# A single row; ragged M, K, N over several tiles of SMALL_TILES; K < 128.
SHAPES = [(1, 128, 128), (40, 300, 200), (17, 64, 33)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp8_matmul_matches_reference(impl, m, k, n):
    # Power-of-two scales make every scaled product exact in fp32, so the backends may differ
    # from the reference only by fp32 summation order: the fp32 tolerance applies.
    ops = _quantized(m, k, n)
    out, ref = _compiled(
        lambda *a: (
            fm.fp8_matmul(*a, out_dtype=jnp.float32, impl=impl, block_sizes=SMALL_TILES),
            fm.reference(*a, out_dtype=jnp.float32),
        ),
        *ops,
    )
    chex.assert_shape(out, (m, n))
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_matmul_bf16_output_and_arbitrary_scales(impl):
    ops = _quantized(40, 300, 200, seed=3, pow2=False)
    out, ref = _compiled(
        lambda *a: (fm.fp8_matmul(*a, impl=impl), fm.reference(*a, out_dtype=jnp.bfloat16)),
        *ops,
    )
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, jnp.bfloat16)


def test_reference_is_the_blockwise_formula():
    # Written out with numpy: sum over K blocks of fp32 block products times both scales.
    xq, xs, wq, ws = _quantized(5, 200, 140, seed=4, pow2=False)
    x, w = np.asarray(xq, np.float32), np.asarray(wq, np.float32)
    xs, ws = np.asarray(xs), np.asarray(ws)
    expected = np.zeros((5, 140), np.float64)
    for kb in range(2):
        ks = slice(kb * 128, (kb + 1) * 128)
        ws_cols = np.repeat(ws[kb], 128)[:140]
        expected += (x[:, ks] @ w[ks, :]) * xs[:, kb, None] * ws_cols[None, :]
    out = fm.reference(*map(jnp.asarray, (xq, xs, wq, ws)), out_dtype=jnp.float32)
    assert_close(out, expected, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_column_weight_scales(impl):
    # The [Kb, N] form (128x1 tiles of the right operand) is what wgrad uses.
    xq, xs, wq, ws = _quantized(24, 256, 72, seed=5)
    ws_cols = quant.repeat_scale(ws, 72, block_size=128, axis=1)
    f = lambda s: fm.fp8_matmul(xq, xs, wq, s, out_dtype=jnp.float32, impl=impl)
    a, b = _compiled(lambda s, c: (f(s), f(c)), ws, ws_cols)
    assert_close(a, b, jnp.float32)


def test_pallas_with_a_non_default_quantization_block():
    ops = _quantized(20, 96, 48, seed=6, block=32)
    bs = BlockSizes(16, 32, 32)
    out, ref = _compiled(
        lambda *a: (
            fm.fp8_matmul(*a, out_dtype=jnp.float32, impl="pallas", block_sizes=bs),
            fm.reference(*a, out_dtype=jnp.float32, block_k=32),
        ),
        *ops,
    )
    assert_close(out, ref, jnp.float32)


def test_v3_sized_dims_on_xla():
    # d_model 7168 -> 256 (one expert's N is 2048; 256 keeps the CPU test fast).
    ops = _quantized(8, 7168, 256, seed=7, pow2=False)
    out, ref = _compiled(
        lambda *a: (fm.fp8_matmul(*a, impl="xla"), fm.reference(*a, out_dtype=jnp.bfloat16)),
        *ops,
    )
    assert_close(out, ref, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_shape,n", [((2, 5, 300), 130), ((7, 64), 16)], ids=["3d_ragged", "k64"])
def test_fp8_linear_forward_and_vjp_match_reference(impl, x_shape, n):
    x, w = _normal(x_shape, 10), _normal((x_shape[-1], n), 11)
    dy = _normal((*x_shape[:-1], n), 12)
    got = _vjp(lambda a, b: fm.fp8_linear(a, b, impl=impl, power_of_two_scale=True), x, w, dy)
    want = _vjp(lambda a, b: fm.fp8_linear_reference(a, b, power_of_two_scale=True), x, w, dy)
    for g, r in zip(got, want, strict=True):
        chex.assert_equal_shape([g, r])
        assert_close(g, r, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_linear_bf16(impl):
    x, w = _normal((40, 300), 13, jnp.bfloat16), _normal((300, 200), 14, jnp.bfloat16)
    dy = _normal((40, 200), 15, jnp.bfloat16)
    got = _vjp(lambda a, b: fm.fp8_linear(a, b, impl=impl), x, w, dy)
    want = _vjp(fm.fp8_linear_reference, x, w, dy)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert_close(g, r, jnp.bfloat16)


def test_fp8_linear_v3_sized_on_xla():
    x, w = _normal((16, 7168), 16, jnp.bfloat16), _normal((7168, 256), 17, jnp.bfloat16)
    dy = _normal((16, 256), 18, jnp.bfloat16)
    got = _vjp(lambda a, b: fm.fp8_linear(a, b, impl="xla"), x, w, dy)
    want = _vjp(fm.fp8_linear_reference, x, w, dy)
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, jnp.bfloat16)


def test_fp8_linear_is_close_to_exact_math():
    # Guards against a mistake shared by kernel and reference (e.g. a wrong transpose in the
    # backward): all three products must approximate the unquantized ones.
    x, w, dy = _normal((64, 256), 19), _normal((256, 96), 20), _normal((64, 96), 21)
    y, dx, dw = _vjp(lambda a, b: fm.fp8_linear(a, b, impl="xla"), x, w, dy)
    hi = jax.lax.Precision.HIGHEST
    assert _rel_err(y, jnp.dot(x, w, precision=hi)) < FP8_VS_EXACT
    assert _rel_err(dx, jnp.dot(dy, w.T, precision=hi)) < FP8_VS_EXACT
    assert _rel_err(dw, jnp.dot(x.T, dy, precision=hi)) < FP8_VS_EXACT


def test_fp8_linear_under_jit_grad():
    x, w = _normal((8, 128), 22), _normal((128, 32), 23)
    loss = lambda a, b: jnp.sum(fm.fp8_linear(a, b, impl="xla") ** 2)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    chex.assert_shape([gx, gw], [(8, 128), (128, 32)])
    chex.assert_tree_all_finite((gx, gw))


def test_shape_and_dtype_errors():
    xq, xs, wq, ws = _quantized(4, 256, 128)
    with pytest.raises(ValueError, match="k=256"):
        fm.fp8_matmul(xq, xs, wq[:128], ws[:1])
    with pytest.raises(ValueError, match="x_scale.shape"):
        fm.fp8_matmul(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="w_scale.shape"):
        fm.fp8_matmul(xq, xs, wq, ws[:, :0])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fm.fp8_matmul(xq.astype(jnp.bfloat16), xs, wq, ws)
    with pytest.raises(ValueError, match="impl='cuda'"):
        fm.fp8_matmul(xq, xs, wq, ws, impl="cuda")
    with pytest.raises(ValueError, match="x.shape"):
        fm.fp8_linear(jnp.ones((4, 100)), jnp.ones((128, 8)))


@pytest.mark.skipif(
    importlib.util.find_spec("jax_triton") is not None, reason="jax-triton is installed"
)
def test_triton_without_jax_triton_names_the_package():
    xq, xs, wq, ws = _quantized(4, 128, 128)
    with pytest.raises(ImportError, match="jax_triton"):
        fm.fp8_matmul(xq, xs, wq, ws, impl="triton")


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_n=96"):
        BlockSizes(block_n=96)
    with pytest.raises(ValueError, match="block_m=0"):
        BlockSizes(block_m=0)
