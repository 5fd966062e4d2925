"""Pure-jnp references of the grouped products (one-hot masks; small shapes only).

They share no code with the "xla" (ragged_dot) or "pallas" backends of grouped_matmul.py, so the
tests that hold those equal to these are independent checks. `grouped_matmul_fp8_reference`
reuses the quantizers of quant.py (tested on their own) and then does dequantized fp32 math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .quant import dequantize_weight, quantize_dequantize_activation, quantize_weight

_HIGHEST = lax.Precision.HIGHEST


def check_group_sizes(group_sizes: jax.Array, e: int) -> None:
    """Raises unless group_sizes is an integer [E] array (values are traced, so not checked)."""
    if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be an integer array of shape ({e},) (one size per expert), "
            f"got {group_sizes.dtype}{list(group_sizes.shape)}"
        )


def valid_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """[M, 1] True for rows that belong to some group (row < sum(group_sizes))."""
    return (jnp.arange(m) < jnp.sum(group_sizes))[:, None]


def check_operands(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> None:
    """Raises unless x [M, K], w [E, K, N] and group_sizes [E] fit together."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [E, K, N], got x{x.shape} and w{w.shape}")
    check_group_sizes(group_sizes, w.shape[0])


def _one_hot_groups(group_sizes: jax.Array, m: int) -> jax.Array:
    """[M, E] float mask: row m belongs to group e. Rows past the total match no group."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(m)[:, None]
    return ((rows >= starts[None, :]) & (rows < ends[None, :])).astype(jnp.float32)


def reference(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """out[m] = x[m] @ w[g(m)] via one-hot masks (differentiable by plain autodiff).

    Args:
      x: [M, K]; w: [E, K, N]; group_sizes: [E] int.
      out_dtype: defaults to x.dtype.
    Returns:
      [M, N]; zero rows past sum(group_sizes).
    """
    onehot = _one_hot_groups(group_sizes, x.shape[0])  # [M, E]
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    out = jnp.einsum("me,mk,ekn->mn", onehot, xf, wf, precision=_HIGHEST)
    return out.astype(out_dtype or x.dtype)


def transposed_reference(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """dw[g] = x_g^T @ dy_g via one-hot masks.

    Args:
      x: [M, K]; dy: [M, N]; group_sizes: [E] int.
      out_dtype: defaults to x.dtype.
    Returns:
      [E, K, N]; zero for empty groups.
    """
    onehot = _one_hot_groups(group_sizes, x.shape[0])  # [M, E]
    out = jnp.einsum(
        "me,mk,mn->ekn", onehot, x.astype(jnp.float32), dy.astype(jnp.float32), precision=_HIGHEST
    )
    return out.astype(out_dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _grouped_fp8_ref(x, w, group_sizes, w_dtype, out_dtype, block_k, power_of_two_scale):
    args = (w_dtype, out_dtype, block_k, power_of_two_scale)
    return _grouped_fp8_ref_fwd(x, w, group_sizes, *args)[0]


def _qdq(a, block_k, power_of_two_scale, axis=-1):
    return quantize_dequantize_activation(
        a, block_size=block_k, axis=axis, power_of_two_scale=power_of_two_scale
    )


def _grouped_fp8_ref_fwd(x, w, group_sizes, w_dtype, out_dtype, block_k, power_of_two_scale):
    wq, ws = quantize_weight(w, block_size=block_k, power_of_two_scale=power_of_two_scale)
    wd = dequantize_weight(wq, ws, block_size=block_k)  # [E, K, N] fp32
    xd = _qdq(x, block_k, power_of_two_scale)
    out = reference(xd, wd, group_sizes, out_dtype=out_dtype or x.dtype)
    return out, (x, wd, group_sizes)


def _grouped_fp8_ref_bwd(w_dtype, out_dtype, block_k, power_of_two_scale, res, dy):
    x, wd, group_sizes = res
    dyd = _qdq(dy, block_k, power_of_two_scale)
    dx = reference(dyd, wd.transpose(0, 2, 1), group_sizes, out_dtype=x.dtype)
    valid = valid_rows(group_sizes, x.shape[0])
    xd_m = _qdq(jnp.where(valid, x, 0), block_k, power_of_two_scale, axis=0)
    dyd_m = _qdq(jnp.where(valid, dy, 0), block_k, power_of_two_scale, axis=0)
    dw = transposed_reference(xd_m, dyd_m, group_sizes, out_dtype=w_dtype)
    return dx, dw, None


_grouped_fp8_ref.defvjp(_grouped_fp8_ref_fwd, _grouped_fp8_ref_bwd)


def grouped_matmul_fp8_reference(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype: jnp.dtype | None = None,
    block_k: int = 128,
    power_of_two_scale: bool = False,
) -> jax.Array:
    """Pure-jnp twin of `grouped_matmul_fp8`: same quantizers, dequantized fp32 one-hot math.

    Args:
      x: [M, K]; w: [E, K, N]; group_sizes: [E] int.
      out_dtype: defaults to x.dtype.
      block_k: quantization block.
      power_of_two_scale: round scales up to powers of two.
    Returns:
      [M, N], with the same custom VJP recipe as `grouped_matmul_fp8`.
    """
    check_operands(x, w, group_sizes)
    w_dtype = jnp.dtype(w.dtype)
    return _grouped_fp8_ref(x, w, group_sizes, w_dtype, out_dtype, block_k, power_of_two_scale)
