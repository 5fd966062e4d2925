"""The plain twin of the routed experts: every expert on every token (test reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.moe.router import Routing


def routed_reference(x: jax.Array, r: Routing, w_gate, w_up, w_down) -> jax.Array:
    """Every expert on every token, weighted by the dense gate matrix [M, E].

    Args:
      x: [M, D]; r: routing (weights/experts [M, K]); w_gate, w_up [E, D, F]; w_down [E, F, D].
    Returns:
      [M, D] sum_e g_{e,t} FFN_e(x_t).
    """
    E = w_gate.shape[0]
    dense_w = jnp.zeros((x.shape[0], E), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], r.experts].add(r.weights)  # [M, E]
    h = jax.nn.silu(jnp.einsum("md,edf->mef", x, w_gate)) * jnp.einsum("md,edf->mef", x, w_up)
    y = jnp.einsum("mef,efd->med", h, w_down)  # [M, E, D]
    return jnp.einsum("med,me->md", y, dense_w.astype(y.dtype))
