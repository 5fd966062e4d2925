"""Rotary position embedding with YaRN context extension.

DeepSeek-V2 report, Sec. 2.1.3 (decoupled RoPE) and Appendix B (YaRN, as used to extend V2/V3
from 4K to 128K): the rope frequencies theta_d = base^(-2d/R) are blended between extrapolation
(high-frequency dims, many rotations over the original context) and interpolation by `factor`
(low-frequency dims) with a linear ramp between the dims that rotate beta_fast and beta_slow times
over `original_max_position_embeddings`; cos/sin are scaled by mscale(factor, mscale) /
mscale(factor, mscale_all_dim) (YaRN eq. 20 as DeepSeek parameterises it).

Two layouts of the rotated pairs: DeepSeek checkpoints rotate *adjacent* pairs (x0, x1), (x2, x3),
... ("interleaved"); Llama-style code rotates (x_i, x_{i+R/2}) ("half-split"). Attention scores
only depend on q.k, so either layout works for training; loading a checkpoint needs the layout it
was trained with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, RopeScaling, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The (fractional) rope dim index that completes `num_rotations` turns over `max_pos`."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [dim/2] (float32), YaRN-blended when `scaling` is given."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    extrapolation = 1.0 / (base**exponents)
    if scaling is None:
        return extrapolation.astype(np.float32)
    interpolation = extrapolation / scaling.factor
    orig = scaling.original_max_position_embeddings
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for interpolated
    inv = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv.astype(np.float32)


def cos_sin_scale(scaling: RopeScaling | None) -> float:
    """The factor YaRN applies to cos/sin (1 without scaling)."""
    if scaling is None:
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return yarn_mscale(scaling.factor)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, R/2] (float32) for integer positions [B, T]."""
    inv = jnp.asarray(inv_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, R/2]
    scale = cos_sin_scale(cfg.rope_scaling)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotates x [B, T, ..., R] by angles whose cos/sin are [B, T, R/2].

    Interleaved rotates (x[2i], x[2i+1]) in place; half-split rotates (x[i], x[i + R/2]).
    """
    extra = x.ndim - cos.ndim  # broadcast over head axes between T and R
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32)
    if interleaved:
        pairs = xf.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))  # [..., R/2, 2]
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
