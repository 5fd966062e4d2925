"""Per-token log-probabilities of given tokens, chunked over time.

log p(y_t | x_<=t) = logits_t[y_t] - logsumexp(logits_t) with logits_t = head(h_t). Post-training
objectives need only this one number (and the entropy, as a metric) per position, so the [B, T, V]
logits are produced `chunk_size` positions at a time inside a `lax.scan`, and each chunk is
rematerialised in the backward pass (`jax.checkpoint`): at most [B, chunk_size, V] logits exist
at once, forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128


def head_logprobs(
    head: Callable[[jax.Array], jax.Array],
    h: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `targets` and the entropy of the predicted distribution at every position.

    Args:
      head: maps hidden states [B, c, D] to fp32 logits [B, c, V] (e.g. `DeepSeekModel.head`).
      h: [B, T, D] normalised last hidden states.
      targets: [B, T] int token ids in [0, V) (masked positions may hold any valid id).
      chunk_size: positions whose logits are materialised at once.
    Returns:
      (logp [B, T] float32, entropy [B, T] float32; the entropy carries no gradient).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    B, T, D = h.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets has shape {targets.shape}, expected [B, T]={(B, T)}")
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)  # [n, B, c, D]
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def chunk(h_c, t_c):
        logits = head(h_c).astype(jnp.float32)  # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, c]
        picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        p = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
        entropy = jax.lax.stop_gradient(lse) - (p * jax.lax.stop_gradient(logits)).sum(-1)
        return picked - lse, entropy

    _, (logp, entropy) = jax.lax.scan(lambda _, x: (None, chunk(*x)), None, (h, t))

    def unchunk(x):  # [n, B, c] -> [B, T]
        return x.swapaxes(0, 1).reshape(B, n * c)[:, :T]

    return unchunk(logp), unchunk(entropy)


def token_logprobs(
    model,
    input_ids: jax.Array,
    targets: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> jax.Array:
    """log p(targets[b, t] | input_ids[b, :t+1]) under `model`, without the full [B, T, V] logits.

    Equals `jax.nn.log_softmax(model(input_ids).logits)` gathered at `targets`.

    Args:
      model: a `DeepSeekModel` (anything with `final_hidden` and `head`).
      input_ids: [B, T] int32.
      targets: [B, T] int32, usually the next tokens (`labels`).
      positions, segment_ids: [B, T] of packed rows, as for `model(...)`.
      chunk_size: positions whose logits are materialised at once.
    Returns:
      [B, T] float32 log-probs.
    """
    h, _ = model.final_hidden(input_ids, positions=positions, segment_ids=segment_ids)
    return head_logprobs(model.head, h, targets, chunk_size=chunk_size)[0]
