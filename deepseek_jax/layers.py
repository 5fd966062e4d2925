"""Shared building blocks: the linear projection (BF16 or FP8) and the SwiGLU feed-forward."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import fp8_weights
from deepseek_jax.config import ModelConfig


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    cfg: ModelConfig,
    std: float | None = None,
) -> nnx.Param:
    """A normal(0, initializer_range) weight with its logical axes as sharding metadata."""
    std = cfg.initializer_range if std is None else std
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(cfg.weight_dtype), logical_axes=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """x [M, K] @ w [K, N] in `compute_dtype`, with the weight gradient kept in w's dtype.

    Autodiff of `dot(x, w.astype(bf16))` forms dW in BF16 and only then casts it to the FP32
    master weight, so every weight gradient is rounded to 8 mantissa bits. DeepSeek-V3 keeps
    weight gradients in FP32 next to FP32 master weights (V3 report Sec. 3.3.3): here dW
    accumulates in FP32 (`preferred_element_type`) and is returned in w.dtype; dx is in x.dtype.
    """
    return jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype))


def _mixed_dot_fwd(x, w, compute_dtype):
    return mixed_dot(x, w, compute_dtype), (x, w)


def _mixed_dot_bwd(compute_dtype, res, g):
    x, w = res
    g = g.astype(compute_dtype)
    dx = jnp.dot(g, w.astype(compute_dtype).T, preferred_element_type=jnp.float32)  # [M, K]
    dw = jnp.dot(x.astype(compute_dtype).T, g, preferred_element_type=jnp.float32)  # [K, N]
    return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def linear(x: jax.Array, w: jax.Array, cfg: ModelConfig, in_dims: int = 1) -> jax.Array:
    """Contracts the last `in_dims` axes of x with the first `in_dims` axes of w.

    Args:
      x: [..., *w.shape[:in_dims]] activations.
      w: weight whose leading `in_dims` axes are contracted.
      cfg: supplies the compute dtype and whether FP8 kernels are used.
    Returns:
      [..., *w.shape[in_dims:]] in the compute dtype.
    """
    if isinstance(w, fp8_weights.Fp8Weight):  # an FP8 serving weight (fp8_weights.py)
        return fp8_weights.linear(x.astype(cfg.compute_dtype), w, in_dims, cfg.compute_dtype)
    lead, k_shape, n_shape = x.shape[:-in_dims], w.shape[:in_dims], w.shape[in_dims:]
    if x.shape[-in_dims:] != k_shape:
        raise ValueError(f"linear: x{x.shape} does not match weight{w.shape} on {in_dims} dims")
    x2 = x.reshape(-1, math.prod(k_shape)).astype(cfg.compute_dtype)  # [M, K]
    w2 = w.reshape(math.prod(k_shape), -1)  # [K, N]
    if cfg.fp8:
        from deepseek_jax.kernels.fp8_matmul import fp8_linear

        # the master weight goes in as is: fp8_linear returns dW in its dtype (FP32)
        y = fp8_linear(x2, w2).astype(cfg.compute_dtype)
    elif jnp.dtype(w2.dtype) != jnp.dtype(cfg.compute_dtype):
        y = mixed_dot(x2, w2, cfg.compute_dtype)  # FP32 weight gradient under BF16 compute
    else:
        y = jnp.dot(x2, w2)
    return y.reshape(lead + n_shape)


class MLP(nnx.Module):
    """SwiGLU feed-forward: W_down(silu(W_gate x) * W_up x). Dense layers and shared experts."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.hidden_size
        self.w_gate = param(rngs, (D, hidden), ("embed", "mlp"), cfg)
        self.w_up = param(rngs, (D, hidden), ("embed", "mlp"), cfg)
        self.w_down = param(rngs, (hidden, D), ("mlp", "embed"), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = jax.nn.silu(linear(x, self.w_gate[...], cfg)) * linear(x, self.w_up[...], cfg)
        return linear(h, self.w_down[...], cfg)  # [..., D]
