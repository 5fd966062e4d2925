"""The routed experts' SwiGLU over groups of rows: FFN_i(u) = W_down,i(silu(W_gate,i u) * W_up,i u).

`swiglu_grouped` runs rows sorted by expert through grouped matmuls (`grouped_matmul`: the Pallas
kernel on GPU, `jax.lax.ragged_dot` elsewhere, or the FP8 recipe); `swiglu_buffers` runs fixed
[E, C, D] buffers as batched einsums. The dropless, capacity and expert-parallel paths all use
these two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax import fp8_weights
from deepseek_jax.kernels.grouped_matmul import grouped_matmul as kernel_grouped_matmul
from deepseek_jax.kernels.grouped_matmul import grouped_matmul_fp8
from deepseek_jax.layers import mixed_dot


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array, fp8: bool = False) -> jax.Array:
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] -> [M, N].

    Dispatches to kernels/grouped_matmul.py: the Pallas kernel on GPU, `jax.lax.ragged_dot`
    elsewhere; `fp8` quantises x (1x128) and w (128x128 per expert) as in the V3 recipe.
    Rows past sum(group_sizes) come out 0.
    """
    if isinstance(w, fp8_weights.Fp8Weight):  # stored FP8 serving weights
        return fp8_weights.grouped_matmul(x, w, group_sizes)
    if fp8:
        return grouped_matmul_fp8(x, w, group_sizes, out_dtype=x.dtype)
    return kernel_grouped_matmul(x, w, group_sizes)


def swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, fp8: bool = False) -> jax.Array:
    """xs [N, D] sorted by expert; w_gate, w_up [E, D, F], w_down [E, F, D]; sizes [E] -> [N, D]."""
    h = jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes, fp8))
    h = h * grouped_matmul(xs, w_up, group_sizes, fp8)  # [N, F]
    return grouped_matmul(h, w_down, group_sizes, fp8)


def swiglu_buffers(buf: jax.Array, w_gate, w_up, w_down, fp8: bool = False) -> jax.Array:
    """Per-expert buffers buf [E, C, D] -> [E, C, D].

    `fp8`: the buffers are E groups of C rows, so the grouped FP8 kernel applies as is (V3
    Sec. 3.3: 1x128 activation tiles, 128x128 weight blocks per expert).
    """
    E, C, D = buf.shape
    if fp8:
        sizes = jnp.full((E,), C, jnp.int32)
        return swiglu_grouped(buf.reshape(E * C, D), w_gate, w_up, w_down, sizes, True).reshape(
            E, C, -1
        )
    h = jax.nn.silu(expert_products(buf, w_gate)) * expert_products(buf, w_up)  # [E, C, F]
    return expert_products(h, w_down)  # [E, C, D]


def expert_products(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [E, C, K] @ w [E, K, N] -> [E, C, N] in x.dtype, one product per expert.

    `layers.mixed_dot` per expert: w may be FP32 master weights under a lower-precision x; the
    weight gradient then accumulates and stays in FP32 (V3 Sec. 3.3.3).
    """
    return jax.vmap(lambda xe, we: mixed_dot(xe, we, x.dtype))(x, w)
