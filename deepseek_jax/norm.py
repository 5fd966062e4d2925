"""RMSNorm (Zhang & Sennrich, 2019), computed in fp32 as DeepSeek's checkpoints expect."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class NormScale(nnx.Param):
    """An RMSNorm scale: a trained parameter that weight decay leaves alone (selected by type,
    so the optimizer does not depend on what a norm is called)."""


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32, returned in x.dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.eps = eps
        self.weight = NormScale(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * xf).astype(x.dtype)
