"""Grouped expert GEMM (the routed experts of DeepSeekMoE), bf16/fp32 and FP8, with custom VJPs.

    out[m] = x[m] @ w[g(m)]          rows of x sorted by expert, g(m) the group owning row m

`group_sizes[g]` rows belong to group g, in order; zero-sized groups are allowed, and rows past
sum(group_sizes) (which must be <= M) belong to no group and produce zeros. The backward needs
    dx = dy @ w[g]^T        a grouped product again, with w transposed per expert;
    dw[g] = x_g^T @ dy_g    the "transposed" grouped product, [E, K, N], zero for empty groups.

Building blocks: `gmm` (forward / dgrad) and `tgmm` (wgrad), each with "xla"
(`jax.lax.ragged_dot[_general]`) and "pallas" (pallas_grouped_matmul.py) backends, and pure-jnp
references built from one-hot masks, without ragged_dot or Pallas (grouped_matmul_reference.py,
re-exported here; that file also holds the input checks the ops share).
Differentiable ops: `grouped_matmul` (operands in their own dtype) and `grouped_matmul_fp8`
(DeepSeek-V3 FP8 recipe, see fp8_matmul.py for the product-by-product description).
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
from .grouped_matmul_reference import (
    check_group_sizes,
    check_operands,
    grouped_matmul_fp8_reference,
    reference,
    transposed_reference,
    valid_rows,
)
from .quant import E4M3, dequantize_activation, quantize_activation, quantize_weight, repeat_scale

__all__ = [
    "BlockSizes",
    "gmm",
    "grouped_matmul",
    "grouped_matmul_fp8",
    "grouped_matmul_fp8_reference",
    "reference",
    "tgmm",
    "transposed_reference",
]

_HIGHEST = lax.Precision.HIGHEST
# lhs [M, K] and rhs [M, N] both ragged along the contracted M: one [K, N] product per group.
_TGMM_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


# ----------------------------------------------------------------------------------------------
# gmm: out[m] = x[m] @ w[g(m)] (optionally FP8 block-scaled).
# ----------------------------------------------------------------------------------------------


def _gmm_xla_fp8(x, w, group_sizes, x_scale, ws_cols, *, out_dtype, block_k):
    m, n = x.shape[0], w.shape[2]
    e = w.shape[0]
    kb = x_scale.shape[1]
    xp, wp = pad_to_multiple(x, 1, block_k), pad_to_multiple(w, 1, block_k)
    gid = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")
    gid = jnp.minimum(gid, e - 1)  # [M]; rows past the total are zeroed by ragged_dot anyway

    def step(i, acc):
        # Slicing one K block per step keeps the extra memory at one [E, bk, N] weight slab.
        xk = lax.dynamic_slice_in_dim(xp, i * block_k, block_k, axis=1)  # [M, bk]
        wk = lax.dynamic_slice_in_dim(wp, i * block_k, block_k, axis=1)  # [E, bk, N]
        # E4M3 values are exact in bf16, so upcasting keeps the products exact while avoiding
        # FP8 ragged_dot, which not every XLA backend implements.
        part = lax.ragged_dot(
            xk.astype(jnp.bfloat16),
            wk.astype(jnp.bfloat16),
            group_sizes,
            preferred_element_type=jnp.float32,
        )  # [M, N]
        ws = lax.dynamic_index_in_dim(ws_cols, i, axis=1, keepdims=False)  # [E, N]
        xs = lax.dynamic_index_in_dim(x_scale, i, axis=1)  # [M, 1]
        return acc + part * xs * ws[gid]

    acc0 = zeros_varying_like((m, n), jnp.float32, xp, wp, x_scale, ws_cols, group_sizes)
    acc = lax.fori_loop(0, kb, step, acc0)  # carry typed for shard_map (the EP path)
    return jnp.where(valid_rows(group_sizes, m), acc, 0.0).astype(out_dtype)


def _gmm_pallas(x, w, group_sizes, x_scale, ws_cols, *, out_dtype, block_sizes):
    from .pallas_grouped_matmul import gmm_pallas

    m, n = x.shape[0], w.shape[2]
    bs = BlockSizes(tile_rows(m, block_sizes.block_m), block_sizes.block_n, block_sizes.block_k)
    bk = bs.block_k
    xp = pad_to_multiple(pad_to_multiple(x, 0, bs.block_m), 1, bk)
    wp = pad_to_multiple(pad_to_multiple(w, 1, bk), 2, bs.block_n)
    if x_scale is not None:
        x_scale = pad_to_multiple(x_scale, 0, bs.block_m)
        ws_cols = pad_to_multiple(ws_cols, 2, bs.block_n)
    out = gmm_pallas(
        xp,
        wp,
        group_sizes,
        x_scale,
        ws_cols,
        out_dtype=out_dtype,
        block_sizes=bs,
        interpret=interpret_mode(),
    )
    return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("out_dtype", "impl", "block_sizes"))
def gmm(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    x_scale: jax.Array | None = None,
    w_scale: jax.Array | None = None,
    out_dtype: jnp.dtype | None = None,
    impl: Impl = "auto",
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Grouped product out[m] = x[m] @ w[g(m)] (no VJP; see `grouped_matmul`).

    With scales the operands are FP8 and the product is block-scaled like `fp8_matmul`.

    Args:
      x: [M, K] rows sorted by group; float8_e4m3fn when scaled, else same dtype as w.
      w: [E, K, N].
      group_sizes: [E] int, sum <= M.
      x_scale: None or [M, ceil(K / block_k)] fp32 (1 x block_k tiles).
      w_scale: None or [E, ceil(K / block_k), ceil(N / block_k)] (blocks) or
        [E, ceil(K / block_k), N] (per column) fp32.
      out_dtype: defaults to x.dtype, or bfloat16 for FP8 operands.
      impl: "auto" | "xla" | "pallas" ("triton" has no grouped kernel).
      block_sizes: kernel tiles; `block_k` is the FP8 quantization block.
    Returns:
      [M, N]; rows past sum(group_sizes) are zero.
    """
    bs = block_sizes or BlockSizes()
    bk = bs.block_k
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [E, K, N], got x{x.shape} and w{w.shape}")
    (m, k), (e, kw, n) = x.shape, w.shape
    if kw != k:
        raise ValueError(f"{k=} (x.shape[1]) must equal w.shape[1]={kw}")
    check_group_sizes(group_sizes, e)
    group_sizes = group_sizes.astype(jnp.int32)  # ragged_dot and the kernel metadata want int32
    scaled = x_scale is not None or w_scale is not None
    ws_cols = None
    if scaled:
        if x_scale is None or w_scale is None:
            raise ValueError("pass both x_scale and w_scale (FP8) or neither")
        if x.dtype != E4M3 or w.dtype != E4M3:
            raise TypeError(f"scaled gmm needs float8_e4m3fn operands, got {x.dtype}, {w.dtype}")
        kb = cdiv(k, bk)
        if x_scale.shape != (m, kb):
            raise ValueError(f"x_scale.shape={x_scale.shape} must be {(m, kb)} for {k=}, {bk=}")
        if w_scale.shape == (e, kb, cdiv(n, bk)):
            ws_cols = repeat_scale(w_scale, n, block_size=bk, axis=2)
        elif w_scale.shape == (e, kb, n):
            ws_cols = w_scale
        else:
            raise ValueError(
                f"w_scale.shape={w_scale.shape} must be {(e, kb, cdiv(n, bk))} or {(e, kb, n)}"
            )
        x_scale, ws_cols = x_scale.astype(jnp.float32), ws_cols.astype(jnp.float32)
        out_dtype = out_dtype or jnp.bfloat16
    elif x.dtype != w.dtype:
        raise TypeError(f"x.dtype={x.dtype} must equal w.dtype={w.dtype}")
    out_dtype = out_dtype or x.dtype
    backend = resolve_impl(impl, op="gmm", triton_available=False)
    if backend == "pallas":
        return _gmm_pallas(x, w, group_sizes, x_scale, ws_cols, out_dtype=out_dtype, block_sizes=bs)
    if scaled:
        return _gmm_xla_fp8(x, w, group_sizes, x_scale, ws_cols, out_dtype=out_dtype, block_k=bk)
    out = lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# tgmm: dw[g] = x_g^T @ dy_g (optionally FP8, block_k x 1 tiles along M).
# ----------------------------------------------------------------------------------------------


def _tgmm_pallas(x, dy, group_sizes, x_scale, dy_scale, *, out_dtype, block_sizes):
    from .pallas_grouped_matmul import tgmm_pallas

    k, n = x.shape[1], dy.shape[1]
    # block_m tiles K (the rows of dw) here; shrink it for small K like the M tile elsewhere.
    bs = BlockSizes(tile_rows(k, block_sizes.block_m), block_sizes.block_n, block_sizes.block_k)
    xp = pad_to_multiple(pad_to_multiple(x, 0, bs.block_k), 1, bs.block_m)
    dyp = pad_to_multiple(pad_to_multiple(dy, 0, bs.block_k), 1, bs.block_n)
    if x_scale is not None:
        x_scale = pad_to_multiple(x_scale, 1, bs.block_m)
        dy_scale = pad_to_multiple(dy_scale, 1, bs.block_n)
    out = tgmm_pallas(
        xp,
        dyp,
        group_sizes,
        x_scale,
        dy_scale,
        out_dtype=out_dtype,
        block_sizes=bs,
        interpret=interpret_mode(),
    )
    return out[:, :k, :n]


@functools.partial(jax.jit, static_argnames=("out_dtype", "impl", "block_sizes"))
def tgmm(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    x_scale: jax.Array | None = None,
    dy_scale: jax.Array | None = None,
    out_dtype: jnp.dtype | None = None,
    impl: Impl = "auto",
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Transposed grouped product dw[g] = x_g^T @ dy_g, the wgrad of `gmm`.

    Args:
      x: [M, K] rows sorted by group; float8_e4m3fn when scaled, else same dtype as dy.
      dy: [M, N].
      group_sizes: [E] int, sum <= M.
      x_scale: None or [ceil(M / block_k), K] fp32 (block_k x 1 tiles along the tokens).
      dy_scale: None or [ceil(M / block_k), N] fp32.
      out_dtype: defaults to x.dtype, or float32 for FP8 operands.
      impl: "auto" | "xla" | "pallas".
      block_sizes: kernel tiles; `block_k` steps over (and quantizes) M.
    Returns:
      [E, K, N]; zero for empty groups.
    """
    bs = block_sizes or BlockSizes()
    bk = bs.block_k
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"x must be [M, K] and dy [M, N], got x{x.shape} and dy{dy.shape}")
    (m, k), n = x.shape, dy.shape[1]
    e = group_sizes.shape[0] if group_sizes.ndim == 1 else -1
    check_group_sizes(group_sizes, e)
    group_sizes = group_sizes.astype(jnp.int32)
    scaled = x_scale is not None or dy_scale is not None
    if scaled:
        if x_scale is None or dy_scale is None:
            raise ValueError("pass both x_scale and dy_scale (FP8) or neither")
        if x.dtype != E4M3 or dy.dtype != E4M3:
            raise TypeError(f"scaled tgmm needs float8_e4m3fn operands, got {x.dtype}, {dy.dtype}")
        mb = cdiv(m, bk)
        if x_scale.shape != (mb, k) or dy_scale.shape != (mb, n):
            raise ValueError(
                f"x_scale.shape={x_scale.shape} and dy_scale.shape={dy_scale.shape} must be "
                f"{(mb, k)} and {(mb, n)} for {m=}, {bk=}"
            )
        x_scale, dy_scale = x_scale.astype(jnp.float32), dy_scale.astype(jnp.float32)
        out_dtype = out_dtype or jnp.float32
    elif x.dtype != dy.dtype:
        raise TypeError(f"x.dtype={x.dtype} must equal dy.dtype={dy.dtype}")
    out_dtype = out_dtype or x.dtype
    backend = resolve_impl(impl, op="tgmm", triton_available=False)
    if backend == "pallas":
        return _tgmm_pallas(
            x, dy, group_sizes, x_scale, dy_scale, out_dtype=out_dtype, block_sizes=bs
        )
    if scaled:
        # The scales change along the contracted M inside a group, so they cannot be pulled out
        # of a ragged_dot; dequantizing to fp32 first is the same sum up to fp32 rounding.
        x = dequantize_activation(x, x_scale, block_size=bk, axis=0)
        dy = dequantize_activation(dy, dy_scale, block_size=bk, axis=0)
    out = lax.ragged_dot_general(
        x, dy, group_sizes, _TGMM_DIMS, precision=_HIGHEST, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Differentiable ops.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped(x, w, group_sizes, out_dtype, impl, block_sizes):
    w = w.astype(x.dtype)  # FP32 master weights run in the compute dtype
    return gmm(x, w, group_sizes, out_dtype=out_dtype, impl=impl, block_sizes=block_sizes)


def _grouped_fwd(x, w, group_sizes, out_dtype, impl, block_sizes):
    return _grouped(x, w, group_sizes, out_dtype, impl, block_sizes), (x, w, group_sizes)


def _grouped_bwd(out_dtype, impl, block_sizes, res, dy):
    x, w, group_sizes = res
    kw = dict(impl=impl, block_sizes=block_sizes)
    # Mixed precision as usual: the cotangent is used in the operands' dtype, fp32 accumulation.
    dy = dy.astype(x.dtype)
    dx = gmm(dy, w.astype(x.dtype).transpose(0, 2, 1), group_sizes, out_dtype=x.dtype, **kw)
    # fp32 accumulation, returned in w.dtype: FP32 for FP32 master weights (V3 Sec. 3.3.3)
    dw = tgmm(x, dy, group_sizes, out_dtype=w.dtype, **kw)  # [E, K, N]
    return dx, dw, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype: jnp.dtype | None = None,
    impl: Impl = "auto",
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Differentiable grouped product out[m] = x[m] @ w[g(m)] (bf16/fp32, fp32 accumulation).

    Args:
      x: [M, K] rows sorted by expert.
      w: [E, K, N] in x.dtype, or FP32 master weights under a lower-precision x: the product
        runs in x.dtype and the weight gradient, accumulated in FP32, is returned in FP32
        (V3 Sec. 3.3.3), never rounded to x.dtype.
      group_sizes: [E] int; zero sizes allowed, sum <= M.
      out_dtype: defaults to x.dtype.
      impl: "auto" | "xla" | "pallas".
      block_sizes: Pallas tiles.
    Returns:
      [M, N]; rows past sum(group_sizes) are zero. Gradients flow to x and w.
    """
    check_operands(x, w, group_sizes)
    if w.dtype != x.dtype and w.dtype != jnp.float32:
        raise TypeError(f"w.dtype={w.dtype} must equal x.dtype={x.dtype} (or be float32)")
    return _grouped(x, w, group_sizes, out_dtype, impl, block_sizes or BlockSizes())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _grouped_fp8(x, w, group_sizes, w_dtype, out_dtype, impl, block_sizes, power_of_two_scale):
    args = (w_dtype, out_dtype, impl, block_sizes, power_of_two_scale)
    return _grouped_fp8_fwd(x, w, group_sizes, *args)[0]


def _grouped_fp8_fwd(x, w, group_sizes, w_dtype, out_dtype, impl, block_sizes, power_of_two_scale):
    bk = block_sizes.block_k
    xq, xs = quantize_activation(x, block_size=bk, power_of_two_scale=power_of_two_scale)
    wq, ws = quantize_weight(w, block_size=bk, power_of_two_scale=power_of_two_scale)  # per expert
    out = gmm(
        xq,
        wq,
        group_sizes,
        x_scale=xs,
        w_scale=ws,
        out_dtype=out_dtype or x.dtype,
        impl=impl,
        block_sizes=block_sizes,
    )
    return out, (x, wq, ws, group_sizes)


def _grouped_fp8_bwd(w_dtype, out_dtype, impl, block_sizes, power_of_two_scale, res, dy):
    x, wq, ws, group_sizes = res
    bk = block_sizes.block_k
    kw = dict(impl=impl, block_sizes=block_sizes)
    quant = functools.partial(
        quantize_activation, block_size=bk, power_of_two_scale=power_of_two_scale
    )
    # Dgrad: dy in 1x128 tiles along N; the expert weights reuse their forward 128x128 blocks.
    dyq, dys = quant(dy)
    wq_t, ws_t = wq.transpose(0, 2, 1), ws.transpose(0, 2, 1)  # [E, N, K], [E, Nb, Kb]
    dx = gmm(dyq, wq_t, group_sizes, x_scale=dys, w_scale=ws_t, out_dtype=x.dtype, **kw)
    # Wgrad contracts over tokens: both operands get 128x1 tiles along M. Tiles are aligned to
    # the global row index, so a tile may span two experts and share one scale; that only costs
    # the expert with the smaller values some precision. Rows outside every group are zeroed
    # first so they cannot inflate a tile's amax.
    valid = valid_rows(group_sizes, x.shape[0])
    xq_m, xs_m = quant(jnp.where(valid, x, 0), axis=0)  # [M, K], [Mb, K]
    dyq_m, dys_m = quant(jnp.where(valid, dy, 0), axis=0)  # [M, N], [Mb, N]
    dw = tgmm(
        xq_m,
        dyq_m,
        group_sizes,
        x_scale=xs_m,
        dy_scale=dys_m,
        out_dtype=w_dtype,
        **kw,
    )
    return dx, dw, None


_grouped_fp8.defvjp(_grouped_fp8_fwd, _grouped_fp8_bwd)


def grouped_matmul_fp8(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype: jnp.dtype | None = None,
    impl: Impl = "auto",
    block_sizes: BlockSizes | None = None,
    power_of_two_scale: bool = False,
) -> jax.Array:
    """Differentiable grouped product in FP8 (DeepSeek-V3 recipe, per-expert weight blocks).

    Forward: x quantized in 1x128 tiles, each expert's weight in 128x128 blocks. Backward: dgrad
    with dy in 1x128 tiles against the forward's FP8 weights transposed; wgrad with x and dy in
    128x1 tiles along the tokens (see fp8_matmul.py).

    Args:
      x: [M, K] bf16/fp32 rows sorted by expert.
      w: [E, K, N] bf16/fp32 expert weights.
      group_sizes: [E] int; zero sizes allowed, sum <= M.
      out_dtype: defaults to x.dtype.
      impl: "auto" | "xla" | "pallas".
      block_sizes: Pallas tiles; `block_k` is the quantization block (default 128).
      power_of_two_scale: round every scale up to a power of two.
    Returns:
      [M, N]; rows past sum(group_sizes) are zero. dx in x.dtype, dw in w.dtype.
    """
    check_operands(x, w, group_sizes)
    bs = block_sizes or BlockSizes()
    w_dtype = jnp.dtype(w.dtype)
    return _grouped_fp8(x, w, group_sizes, w_dtype, out_dtype, impl, bs, power_of_two_scale)
