"""Token sampling with per-row temperature, top-k and top-p, as arrays (one program, mixed values).

Order of the filters (the usual one, as in HF transformers and vLLM): divide the logits by the
row's temperature, keep the `top_k` largest (0 = all), then keep the smallest set of the most
probable remaining tokens whose renormalised mass reaches `top_p` (the token that crosses the
threshold is kept), and draw from what is left. Temperature 0 is greedy (argmax of the raw
logits). The log-probability reported for a token is always the raw model one,
log_softmax(logits), before any of these transformations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Applies temperature, top-k and top-p per row.

    Args:
      logits: [B, V] fp32; temperature: [B] (0 rows are scaled by 1, they decode greedily);
      top_k: [B] int32 (0 = off); top_p: [B] in (0, 1].
    Returns:
      (order [B, V] token ids by decreasing logit, kept [B, V] scaled logits in that order with
      -inf on filtered tokens).
    """
    V = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / t[:, None]  # [B, V]
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V]
    s = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])  # exactly k kept, ties by id
    s = jnp.where(keep, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    mass_before = jnp.cumsum(p, axis=-1) - p  # mass of the strictly more probable tokens
    keep &= (mass_before < top_p[:, None]) | (rank == 0)
    return order, jnp.where(keep, s, -jnp.inf)


def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits: [B, V] fp32 raw logits; keys: [B] typed PRNG keys (one per row);
      temperature, top_k, top_p: [B] per-row parameters (see `filtered_logits`).
    Returns:
      (tokens [B] int32, raw log-probabilities [B] fp32 of those tokens).
    """
    order, kept = filtered_logits(logits, temperature, top_k, top_p)
    idx = jax.vmap(jax.random.categorical)(keys, kept)  # [B] index into `order`
    drawn = jnp.take_along_axis(order, idx[:, None], axis=-1)[:, 0]
    greedy = jnp.argmax(logits, axis=-1)
    tokens = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
