"""FP8 block-scaled matmul and the differentiable FP8 linear op (DeepSeek-V3 Sec. 3.3).

    out[m, n] = sum_kb (sum_{k in kb} x_fp8[m, k] w_fp8[k, n])_fp32 * x_scale[m, kb] w_scale[kb, n]

with kb running over blocks of 128 along K: every partial product is accumulated in fp32 and
rescaled once per block, as the report's "promotion every 128 elements" prescribes.

Layout is JAX's: x [M, K] @ w [K, N]; activation scales [M, ceil(K/128)] (1x128 tiles), weight
scales [ceil(K/128), ceil(N/128)] (128x128 blocks). `w_scale` may also be given per column,
[ceil(K/128), N] (128x1 tiles of the right operand), which the wgrad product needs.

Backends: `reference` (pure jnp, the formula above), "xla" (a loop over K blocks), "pallas"
(pallas_fp8_matmul.py; interpreted on CPU) and "triton" (triton_fp8_matmul.py, needs jax-triton).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from deepseek_jax.sharding.logical import zeros_varying_like

from .backend import (
    BlockSizes,
    Impl,
    cdiv,
    interpret_mode,
    pad_to_multiple,
    resolve_impl,
    tile_rows,
)
from .quant import (
    E4M3,
    dequantize_weight,
    quantize_activation,
    quantize_dequantize_activation,
    quantize_weight,
    repeat_scale,
)

__all__ = [
    "BlockSizes",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_matmul",
    "reference",
]


def _check_operands(x, x_scale, w, w_scale, block_k: int) -> jax.Array:
    """Validates shapes and dtypes; returns w_scale expanded to one scale per column [Kb, N]."""
    for name, a in (("x_fp8", x), ("w_fp8", w)):
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
        if a.dtype != E4M3:
            raise TypeError(f"{name}.dtype={a.dtype} must be float8_e4m3fn")
    m, k = x.shape
    kw, n = w.shape
    if kw != k:
        raise ValueError(f"{k=} (x_fp8.shape[1]) must equal w_fp8.shape[0]={kw}")
    kb = cdiv(k, block_k)
    if x_scale.shape != (m, kb):
        raise ValueError(
            f"x_scale.shape={x_scale.shape} must be (m, ceil(k / block_k)) = {(m, kb)} "
            f"for {m=}, {k=}, {block_k=}"
        )
    if w_scale.shape == (kb, n):
        return w_scale
    if w_scale.shape != (kb, cdiv(n, block_k)):
        raise ValueError(
            f"w_scale.shape={w_scale.shape} must be {(kb, cdiv(n, block_k))} (block_k x block_k "
            f"blocks) or {(kb, n)} (per column) for {k=}, {n=}, {block_k=}"
        )
    return repeat_scale(w_scale, n, block_size=block_k, axis=1)


def _reference_cols(x, x_scale, w, ws_cols, *, out_dtype, block_k):
    kb = x_scale.shape[1]
    xb = pad_to_multiple(x.astype(jnp.float32), 1, block_k).reshape(x.shape[0], kb, block_k)
    wb = pad_to_multiple(w.astype(jnp.float32), 0, block_k).reshape(kb, block_k, w.shape[1])
    # [Kb, M, N]: one fp32 partial product per K block (products of E4M3 values are exact in fp32).
    parts = jnp.einsum("mab,abn->amn", xb, wb, precision=lax.Precision.HIGHEST)
    out = jnp.sum(parts * x_scale.T[:, :, None] * ws_cols[:, None, :], axis=0)
    return out.astype(out_dtype)


def reference(
    x_fp8: jax.Array,
    x_scale: jax.Array,
    w_fp8: jax.Array,
    w_scale: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    block_k: int = 128,
) -> jax.Array:
    """The block-scaled product written out literally (small shapes: builds [Kb, M, N]).

    Args:
      x_fp8: [M, K] float8_e4m3fn.
      x_scale: [M, ceil(K / block_k)] fp32.
      w_fp8: [K, N] float8_e4m3fn.
      w_scale: [ceil(K / block_k), ceil(N / block_k)] or [ceil(K / block_k), N] fp32.
      out_dtype: output dtype.
      block_k: quantization block along K.
    Returns:
      [M, N] in out_dtype.
    """
    ws_cols = _check_operands(x_fp8, x_scale, w_fp8, w_scale, block_k)
    return _reference_cols(x_fp8, x_scale, w_fp8, ws_cols, out_dtype=out_dtype, block_k=block_k)


def _fp8_matmul_xla(x, x_scale, w, ws_cols, *, out_dtype, block_k):
    m, n = x.shape[0], w.shape[1]
    kb = x_scale.shape[1]
    xp, wp = pad_to_multiple(x, 1, block_k), pad_to_multiple(w, 0, block_k)

    def step(i, acc):
        xk = lax.dynamic_slice_in_dim(xp, i * block_k, block_k, axis=1)  # [M, bk]
        wk = lax.dynamic_slice_in_dim(wp, i * block_k, block_k, axis=0)  # [bk, N]
        part = jnp.dot(xk, wk, preferred_element_type=jnp.float32)  # [M, N]
        xs = lax.dynamic_index_in_dim(x_scale, i, axis=1)  # [M, 1]
        ws = lax.dynamic_index_in_dim(ws_cols, i, axis=0)  # [1, N]
        return acc + part * xs * ws

    # A loop keeps memory at one [M, N] accumulator where a batched einsum would hold [Kb, M, N].
    acc0 = zeros_varying_like((m, n), jnp.float32, xp, wp, x_scale, ws_cols)
    acc = lax.fori_loop(0, kb, step, acc0)  # carry typed for shard_map (the EP path)
    return acc.astype(out_dtype)


def _fp8_matmul_pallas(x, x_scale, w, ws_cols, *, out_dtype, block_sizes):
    from .pallas_fp8_matmul import fp8_matmul_pallas

    m, n = x.shape[0], w.shape[1]
    bs = BlockSizes(tile_rows(m, block_sizes.block_m), block_sizes.block_n, block_sizes.block_k)
    # Pad to whole tiles (a no-op at aligned V3 shapes); zero padding adds nothing to the sums.
    xp = pad_to_multiple(pad_to_multiple(x, 0, bs.block_m), 1, bs.block_k)
    xsp = pad_to_multiple(x_scale, 0, bs.block_m)
    wp = pad_to_multiple(pad_to_multiple(w, 0, bs.block_k), 1, bs.block_n)
    wsp = pad_to_multiple(ws_cols, 1, bs.block_n)
    out = fp8_matmul_pallas(
        xp, xsp, wp, wsp, out_dtype=out_dtype, block_sizes=bs, interpret=interpret_mode()
    )
    return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("out_dtype", "impl", "block_sizes"))
def fp8_matmul(
    x_fp8: jax.Array,
    x_scale: jax.Array,
    w_fp8: jax.Array,
    w_scale: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    impl: Impl = "auto",
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """FP8 block-scaled matmul with fp32 accumulation promoted once per K block.

    Args:
      x_fp8: [M, K] float8_e4m3fn activations.
      x_scale: [M, ceil(K / block_k)] fp32 scales of the 1 x block_k activation tiles.
      w_fp8: [K, N] float8_e4m3fn weight.
      w_scale: [ceil(K / block_k), ceil(N / block_k)] fp32 scales of block_k x block_k weight
        blocks, or [ceil(K / block_k), N] (one scale per column per K block).
      out_dtype: output dtype.
      impl: "auto" | "xla" | "pallas" | "triton" (see backend.py).
      block_sizes: kernel tiles; `block_k` is the quantization block (default 128).
    Returns:
      [M, N] in out_dtype.
    """
    block_sizes = block_sizes or BlockSizes()
    bk = block_sizes.block_k
    ws_cols = _check_operands(x_fp8, x_scale, w_fp8, w_scale, bk).astype(jnp.float32)
    x_scale = x_scale.astype(jnp.float32)
    backend = resolve_impl(impl, op="fp8_matmul")
    if backend == "xla":
        return _fp8_matmul_xla(x_fp8, x_scale, w_fp8, ws_cols, out_dtype=out_dtype, block_k=bk)
    if backend == "pallas":
        return _fp8_matmul_pallas(
            x_fp8, x_scale, w_fp8, ws_cols, out_dtype=out_dtype, block_sizes=block_sizes
        )
    from .triton_fp8_matmul import fp8_matmul_triton

    return fp8_matmul_triton(
        x_fp8, x_scale, w_fp8, ws_cols, out_dtype=out_dtype, block_sizes=block_sizes
    )


# ----------------------------------------------------------------------------------------------
# Differentiable FP8 linear.
#
# Forward:  y  = Q(x)_{1x128} @ Q(w)_{128x128}                                    (Fprop)
# Backward: dx = Q(dy)_{1x128 along N} @ Q(w)^T                                    (Dgrad)
#           dw = Q(x)_{128x1 along M}^T @ Q(dy)_{128x1 along M}                    (Wgrad)
# Q(w)^T reuses the forward's FP8 weight: transposing a 128x128-block-quantized matrix only
# transposes its scale grid, so no re-quantization is needed. Wgrad contracts over the tokens,
# so both of its operands are re-quantized with tiles running along M. The residual is x in its
# own dtype rather than its forward FP8 copy (which the report caches to save memory): quantizing
# the FP8 copy a second time along M would compound two rounding errors. The gradient of the
# quantizer itself is treated as identity (straight-through), as in the report.
# ----------------------------------------------------------------------------------------------


def _flatten(x: jax.Array, w: jax.Array) -> jax.Array:
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [K, N], got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x.shape[-1] must equal k=w.shape[0]={w.shape[0]}, got x{x.shape}")
    return x.reshape(-1, x.shape[-1])  # [M, K]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fp8_linear(x, w, w_dtype, impl, block_sizes, power_of_two_scale):
    return _fp8_linear_fwd(x, w, w_dtype, impl, block_sizes, power_of_two_scale)[0]


def _fp8_linear_fwd(x, w, w_dtype, impl, block_sizes, power_of_two_scale):
    bk = block_sizes.block_k
    xq, xs = quantize_activation(x, block_size=bk, power_of_two_scale=power_of_two_scale)
    wq, ws = quantize_weight(w, block_size=bk, power_of_two_scale=power_of_two_scale)
    y = fp8_matmul(xq, xs, wq, ws, out_dtype=x.dtype, impl=impl, block_sizes=block_sizes)
    return y, (x, wq, ws)


def _fp8_linear_bwd(w_dtype, impl, block_sizes, power_of_two_scale, res, dy):
    x, wq, ws = res
    bk = block_sizes.block_k
    kw = dict(impl=impl, block_sizes=block_sizes)
    quant = functools.partial(
        quantize_activation, block_size=bk, power_of_two_scale=power_of_two_scale
    )
    dyq, dys = quant(dy)  # [M, N], [M, Nb]: 1x128 tiles along dgrad's contraction N
    dx = fp8_matmul(dyq, dys, wq.T, ws.T, out_dtype=x.dtype, **kw)  # [M, K]
    xq_m, xs_m = quant(x, axis=0)  # [M, K], [Mb, K]: 128x1 tiles along the tokens
    dyq_m, dys_m = quant(dy, axis=0)  # [M, N], [Mb, N]
    dw = fp8_matmul(xq_m.T, xs_m.T, dyq_m, dys_m, out_dtype=w_dtype, **kw)  # [K, N]
    return dx, dw


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_linear(
    x: jax.Array,
    w: jax.Array,
    *,
    impl: Impl = "auto",
    block_sizes: BlockSizes | None = None,
    power_of_two_scale: bool = False,
) -> jax.Array:
    """y = x @ w computed in FP8 with fine-grained scaling; differentiable (custom VJP).

    Args:
      x: [..., K] bf16/fp32 activations.
      w: [K, N] bf16/fp32 weight (the master copy is quantized on the fly each call).
      impl: backend of the three FP8 products (see backend.py).
      block_sizes: kernel tiles; `block_k` is the quantization block (default 128).
      power_of_two_scale: round every scale (x, w and dy) up to a power of two.
    Returns:
      [..., N] in x.dtype. Gradients: dx in x.dtype, dw in w.dtype.
    """
    x2 = _flatten(x, w)
    bs = block_sizes or BlockSizes()
    y = _fp8_linear(x2, w, jnp.dtype(w.dtype), impl, bs, power_of_two_scale)
    return y.reshape(*x.shape[:-1], w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fp8_linear_ref(x, w, w_dtype, block_k, power_of_two_scale):
    return _fp8_linear_ref_fwd(x, w, w_dtype, block_k, power_of_two_scale)[0]


def _qdq(a, block_k, power_of_two_scale, axis=-1):
    return quantize_dequantize_activation(
        a, block_size=block_k, axis=axis, power_of_two_scale=power_of_two_scale
    )


def _fp8_linear_ref_fwd(x, w, w_dtype, block_k, power_of_two_scale):
    wq, ws = quantize_weight(w, block_size=block_k, power_of_two_scale=power_of_two_scale)
    wd = dequantize_weight(wq, ws, block_size=block_k)  # [K, N] fp32
    xd = _qdq(x, block_k, power_of_two_scale)
    y = jnp.dot(xd, wd, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype), (x, wd)


def _fp8_linear_ref_bwd(w_dtype, block_k, power_of_two_scale, res, dy):
    x, wd = res
    hi = lax.Precision.HIGHEST
    dx = jnp.dot(_qdq(dy, block_k, power_of_two_scale), wd.T, precision=hi)
    xd_m = _qdq(x, block_k, power_of_two_scale, axis=0)
    dyd_m = _qdq(dy, block_k, power_of_two_scale, axis=0)
    dw = jnp.dot(xd_m.T, dyd_m, precision=hi)
    return dx.astype(x.dtype), dw.astype(w_dtype)


_fp8_linear_ref.defvjp(_fp8_linear_ref_fwd, _fp8_linear_ref_bwd)


def fp8_linear_reference(
    x: jax.Array, w: jax.Array, *, block_k: int = 128, power_of_two_scale: bool = False
) -> jax.Array:
    """Pure-jnp twin of `fp8_linear`: same quantizers, then dequantize and multiply in fp32.

    Args:
      x: [..., K] activations.
      w: [K, N] weight.
      block_k: quantization block.
      power_of_two_scale: round scales up to powers of two.
    Returns:
      [..., N] in x.dtype, with the same custom VJP recipe as `fp8_linear`.
    """
    x2 = _flatten(x, w)
    y = _fp8_linear_ref(x2, w, jnp.dtype(w.dtype), block_k, power_of_two_scale)
    return y.reshape(*x.shape[:-1], w.shape[1])
