"""The decode-cache contract shared by MLA's latent cache and standard attention's KV cache.

Slot index == position: `decode(x [B, T, D], positions [B, T], cache)` writes the T new entries of
row b at slots positions[b, :] (a scatter, no copies), then lets the query at position p attend
the slots s <= p of its own row. Rows of a ragged batch are right-padded; a padded token may write
garbage beyond its row's length, which is harmless: a later real token at that position overwrites
the slot before any query can attend to it (write, then attend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_slots(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatters new [B, T, ...] into cache [B, S, ...] at slots positions [B, T] (int32).

    Positions outside [0, S) are dropped, so they never corrupt another slot.
    """
    S = cache.shape[1]
    slots = jnp.where((positions >= 0) & (positions < S), positions, S)  # S is out of range
    rows = jnp.arange(cache.shape[0])[:, None]  # [B, 1]
    return cache.at[rows, slots].set(new.astype(cache.dtype), mode="drop")


def slot_mask(positions: jax.Array, num_slots: int) -> jax.Array:
    """Causal mask over the cache: [B, T, S], True where slot s <= the query's position."""
    return jnp.arange(num_slots)[None, None, :] <= positions[:, :, None]
