"""Per-expert batched product out[e] = x[e] @ w[e] of fixed-capacity buffers (the capacity MoE
path), with FP32 weight gradients from FP32 master weights (V3 Sec. 3.3.3).

Plain autodiff of `einsum(x_bf16, w.astype(bf16))` rounds dW to BF16; this custom VJP keeps the
product in the compute dtype and accumulates and returns dW = x[e]^T dy[e] in FP32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _product(x, w):
    return jnp.einsum("eck,ekn->ecn", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _expert_matmul(x, w):
    return _product(x, w).astype(x.dtype)


def _fwd(x, w):
    return _expert_matmul(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    dx = jnp.einsum("ecn,ekn->eck", dy, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("eck,ecn->ekn", x, dy, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_expert_matmul.defvjp(_fwd, _bwd)


def expert_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [E, C, K] @ w [E, K, N] -> [E, C, N] in x.dtype (fp32 accumulation), differentiable.

    Args:
      x: per-expert buffers.
      w: [E, K, N] in x.dtype, or FP32 master weights under a lower-precision x (cast for the
        product; the weight gradient is returned in FP32).
    """
    if x.ndim != 3 or w.ndim != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(f"x must be [E, C, K] and w [E, K, N], got x{x.shape} and w{w.shape}")
    if w.dtype != x.dtype and w.dtype != jnp.float32:
        raise TypeError(f"w.dtype={w.dtype} must equal x.dtype={x.dtype} (or be float32)")
    return _expert_matmul(x, w)
