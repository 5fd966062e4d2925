"""Fine-grained E4M3 quantization (DeepSeek-V3 report, Sec. 3.3.2).

Activations are scaled per 1x128 tile (128 consecutive elements of one row along the contraction
dimension); weights per 128x128 block. Each tile gets scale = amax / 448 so that its largest
element maps onto E4M3's largest finite value, and x ~= x_fp8 * scale.

Ragged edges (a dimension not a multiple of the block) are handled by zero-padding internally:
the last tile is simply narrower, its zeros do not change its amax, and the padding is sliced off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .backend import cdiv

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn; there is no inf, overflow casts to NaN
DEFAULT_BLOCK = 128
_INV_E4M3_MAX = np.float32(1.0 / E4M3_MAX)


def _check_block(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"{block_size=} must be a positive integer")


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def round_up_to_power_of_two(s: jax.Array) -> jax.Array:
    """Smallest power of two >= s, for positive finite s (exact: no log2 rounding)."""
    mant, exp = jnp.frexp(s)  # s = mant * 2**exp with mant in [0.5, 1)
    exp = jnp.where(mant == 0.5, exp - 1, exp)  # s already a power of two
    return jnp.ldexp(jnp.ones_like(s), exp)


def scale_from_amax(amax: jax.Array, *, power_of_two_scale: bool = False) -> jax.Array:
    """scale = amax / 448 in fp32; 1 where that is 0 (an all-zero tile quantizes to zeros anyway).

    The quotient is formed as amax * fl(1/448): one IEEE multiply, bit-identical on every backend
    and within 1 ulp of the correctly rounded amax / 448. (XLA:CPU's fp32 division is not
    correctly rounded -- about half of all quotients by 448 come out 1 ulp off -- so a plain `/`
    would make scales backend-dependent.)

    Power-of-two scales (rounded *up*, so |x / scale| stays <= 448) make dequantization exact and
    rescaling a pure exponent shift.
    """
    scale = amax.astype(jnp.float32) * _INV_E4M3_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # also catches amax so small that /448 underflows
    if power_of_two_scale:
        scale = round_up_to_power_of_two(scale)
    return scale


def _to_e4m3(x: jax.Array, scale: jax.Array) -> jax.Array:
    # fp32 division can land a hair above 448; E4M3 has no inf and casts overflow to NaN.
    return jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


@functools.partial(jax.jit, static_argnames=("size", "block_size", "axis"))
def repeat_scale(scale: jax.Array, size: int, *, block_size: int, axis: int = -1) -> jax.Array:
    """Repeats each block scale `block_size` times along `axis` and trims to `size` entries.

    Args:
      scale: [..., ceil(size / block_size), ...] per-block scales.
      size: length of the un-blocked dimension.
      block_size: block length along `axis`.
      axis: the blocked axis.
    Returns:
      [..., size, ...] one scale per element along `axis`.
    """
    full = jnp.repeat(scale, block_size, axis=axis)
    return jax.lax.slice_in_dim(full, 0, size, axis=axis)


@functools.partial(jax.jit, static_argnames=("block_size", "axis", "power_of_two_scale"))
def quantize_activation(
    x: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK,
    axis: int = -1,
    power_of_two_scale: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes to E4M3 in 1 x block_size tiles running along `axis`.

    With the default `axis=-1` and x [M, K] this is the forward-pass activation tiling (tiles along
    the contraction K). `axis=0` gives block_size x 1 tiles along the tokens, which the wgrad
    product x^T @ dy needs because there the contraction runs over M.

    Args:
      x: [..., L, ...] floating-point array; L = x.shape[axis].
      block_size: tile length along `axis`.
      axis: the tiled axis.
      power_of_two_scale: round each scale up to a power of two.
    Returns:
      x_fp8: same shape as x, float8_e4m3fn.
      scale: fp32, x.shape with L replaced by ceil(L / block_size).
    """
    _check_block(block_size)
    _check_float("x", x)
    axis = axis % x.ndim
    xt = jnp.moveaxis(x.astype(jnp.float32), axis, -1)  # [..., L]
    length = xt.shape[-1]
    nb = cdiv(length, block_size)
    xt = jnp.pad(xt, [(0, 0)] * (xt.ndim - 1) + [(0, nb * block_size - length)])
    xt = xt.reshape(*xt.shape[:-1], nb, block_size)  # [..., Lb, block]
    scale = scale_from_amax(jnp.max(jnp.abs(xt), axis=-1), power_of_two_scale=power_of_two_scale)
    q = _to_e4m3(xt, scale[..., None]).reshape(*xt.shape[:-2], nb * block_size)[..., :length]
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(scale, -1, axis)


@functools.partial(jax.jit, static_argnames=("block_size", "axis", "dtype"))
def dequantize_activation(
    x_fp8: jax.Array,
    scale: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK,
    axis: int = -1,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Inverse of `quantize_activation`: x_fp8 * scale, broadcast over each tile.

    Args:
      x_fp8: [..., L, ...] quantized values.
      scale: x_fp8.shape with L replaced by ceil(L / block_size).
      block_size: tile length along `axis`.
      axis: the tiled axis.
      dtype: result dtype (the product is formed in fp32 first).
    Returns:
      [..., L, ...] in `dtype`.
    """
    _check_block(block_size)
    axis = axis % x_fp8.ndim
    expected = list(x_fp8.shape)
    expected[axis] = cdiv(x_fp8.shape[axis], block_size)
    if scale.shape != tuple(expected):
        raise ValueError(
            f"scale.shape={scale.shape} must be {tuple(expected)} for x_fp8.shape={x_fp8.shape}, "
            f"{block_size=}, {axis=}"
        )
    s = repeat_scale(scale.astype(jnp.float32), x_fp8.shape[axis], block_size=block_size, axis=axis)
    return (x_fp8.astype(jnp.float32) * s).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "power_of_two_scale"))
def quantize_weight(
    w: jax.Array, *, block_size: int = DEFAULT_BLOCK, power_of_two_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Quantizes the last two axes to E4M3 in block_size x block_size blocks.

    Leading axes (e.g. experts) are independent: w [E, K, N] gets one scale grid per expert.

    Args:
      w: [..., K, N] floating-point weight.
      block_size: block edge.
      power_of_two_scale: round each scale up to a power of two.
    Returns:
      w_fp8: [..., K, N] float8_e4m3fn.
      scale: [..., ceil(K / block_size), ceil(N / block_size)] fp32.
    """
    _check_block(block_size)
    _check_float("w", w)
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 dims [..., K, N], got shape {w.shape}")
    *lead, k, n = w.shape
    kb, nb = cdiv(k, block_size), cdiv(n, block_size)
    pad = [(0, 0)] * len(lead) + [(0, kb * block_size - k), (0, nb * block_size - n)]
    wb = jnp.pad(w.astype(jnp.float32), pad)
    wb = wb.reshape(*lead, kb, block_size, nb, block_size)  # [..., Kb, bk, Nb, bn]
    scale = scale_from_amax(
        jnp.max(jnp.abs(wb), axis=(-3, -1)), power_of_two_scale=power_of_two_scale
    )  # [..., Kb, Nb]
    q = _to_e4m3(wb, scale[..., :, None, :, None])
    q = q.reshape(*lead, kb * block_size, nb * block_size)[..., :k, :n]
    return q, scale


@functools.partial(jax.jit, static_argnames=("block_size", "dtype"))
def dequantize_weight(
    w_fp8: jax.Array,
    scale: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Inverse of `quantize_weight`.

    Args:
      w_fp8: [..., K, N] quantized weight.
      scale: [..., ceil(K / block_size), ceil(N / block_size)].
      block_size: block edge.
      dtype: result dtype (the product is formed in fp32 first).
    Returns:
      [..., K, N] in `dtype`.
    """
    _check_block(block_size)
    *lead, k, n = w_fp8.shape
    expected = (*lead, cdiv(k, block_size), cdiv(n, block_size))
    if scale.shape != expected:
        raise ValueError(
            f"scale.shape={scale.shape} must be {expected} for w_fp8.shape={w_fp8.shape}, "
            f"{block_size=}"
        )
    s = repeat_scale(scale.astype(jnp.float32), k, block_size=block_size, axis=-2)
    s = repeat_scale(s, n, block_size=block_size, axis=-1)  # [..., K, N]
    return (w_fp8.astype(jnp.float32) * s).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "axis", "power_of_two_scale"))
def quantize_dequantize_activation(
    x: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK,
    axis: int = -1,
    power_of_two_scale: bool = False,
) -> jax.Array:
    """x rounded through E4M3 with 1 x block_size tiles along `axis`, returned in fp32.

    The pure-jnp references use it to reproduce exactly what the FP8 kernels see.
    """
    q, s = quantize_activation(
        x, block_size=block_size, axis=axis, power_of_two_scale=power_of_two_scale
    )
    return dequantize_activation(q, s, block_size=block_size, axis=axis)
