"""Standard multi-head and grouped-query attention with RoPE (DeepSeek LLM, arXiv 2401.02954).

DeepSeek LLM 7B and DeepSeekMath 7B use multi-head attention, DeepSeek LLM 67B grouped-query
attention (64 query heads sharing 8 key/value heads); both LLaMA-style, RoPE on the whole head:

    q_t,i = RoPE(W^Q_i h_t),  k_t,j = RoPE(W^K_j h_t),  v_t,j = W^V_j h_t   (j = i // (N / N_kv))
    o_t,i = sum_s softmax_s(q_t,i . k_s,j / sqrt(H)) v_s,j,   u_t = W^O [o_t,1; ...; o_t,N]

Weights (JAX layout, head axes explicit): wq [D, N, H], wk / wv [D, N_kv, H], wo [N, H, D]. The
hub checkpoints are `LlamaForCausalLM`, whose q/k projections rotate half-split pairs
(x_i, x_{i+H/2}); `cfg.rope_interleave=False` applies that layout (see rope.py).

Two paths, as MLA's: `__call__` for training/prefill over a (packed) sequence, and `decode`, which
writes the new tokens' keys and values into a per-head `KVCache` at their positions and attends
over the cache (the decode contract shared with MLA: slot index == position, write then attend).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.decode_cache import slot_mask, write_slots
from deepseek_jax.layers import linear, param
from deepseek_jax.mla import attention_mask, causal_query_blocks
from deepseek_jax.rope import apply_rope, rope_tables

_NEG = -1e30  # finite "minus infinity" keeps fully-masked rows NaN-free


class KVCache(NamedTuple):
    """Per-layer key/value cache of standard attention: slot s holds position s."""

    k: jax.Array  # [B, S, N_kv, H] rotated keys
    v: jax.Array  # [B, S, N_kv, H] values


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, max_len, cfg.kv_heads, cfg.attn_head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Attention(nnx.Module):
    """MHA / GQA with RoPE over the whole head (`cfg.attention_type == "mha"`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
        self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg)
        self.wk = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.wv = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), cfg)

    def _qkv(self, x, positions):
        """x [B, T, D] -> rotated q [B, T, N, H], rotated k and v [B, T, N_kv, H]."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg, positions)  # [B, T, H/2]
        q = apply_rope(linear(x, self.wq[...], cfg), cos, sin, interleaved=cfg.rope_interleave)
        k = apply_rope(linear(x, self.wk[...], cfg), cos, sin, interleaved=cfg.rope_interleave)
        return q, k, linear(x, self.wv[...], cfg)

    def _attend(self, q, k, v, mask, blocks=None):
        """q [B, T, N, H], k/v [B, S, N_kv, H], mask broadcastable to [B, T, S] -> [B, T, D].

        `blocks`: causal query blocks (`mla.causal_query_blocks`): rows [a, b) attend keys
        [0, b) only; None = every query over all S keys.
        """
        cfg = self.cfg
        B, T, N, H = q.shape
        K = k.shape[2]
        qg = q.reshape(B, T, K, N // K, H)  # query head i uses kv head i // (N / N_kv)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        outs = []
        for a, b in blocks or [(0, T)]:
            e = None if blocks is None else b  # keys [0, e)
            scores = jnp.einsum(
                "btkgh,bskh->bkgts", qg[:, a:b], k[:, :e], preferred_element_type=jnp.float32
            )
            m = mask[:, None, None, a:b, :e]
            scores = jnp.where(m, scores * cfg.softmax_scale, _NEG)
            probs = jax.nn.softmax(scores, axis=-1)  # [B, N_kv, N/N_kv, b - a, S]
            outs.append(jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v[:, :e]))
        out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]  # [B, T, N_kv, G, H]
        out = out.reshape(B, T, N, H)
        return linear(out, self.wo[...], cfg, in_dims=2)  # [B, T, D]

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Full-sequence causal attention.

        Args:
          x: [B, T, D]; positions: [B, T] int32 (restart per packed document);
          segment_ids: [B, T] document ids of packed sequences, or None.
        Returns:
          [B, T, D].
        """
        q, k, v = self._qkv(x, positions)
        T = x.shape[1]
        return self._attend(q, k, v, attention_mask(segment_ids, T), causal_query_blocks(T))

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Writes T new tokens at slots `positions` of their rows, then attends over the cache.

        The query at position p sees slots s <= p of its own row. Right-padded rows of a ragged
        batch may write garbage beyond their length: a later real token at that position
        overwrites the slot before any query can attend to it.

        Args:
          x: [B, T, D] new tokens; positions: [B, T] int32 their positions (= cache slots);
          cache: KVCache with S slots.
        Returns:
          ([B, T, D], updated cache).
        """
        q, k, v = self._qkv(x, positions)
        cache = KVCache(write_slots(cache.k, k, positions), write_slots(cache.v, v, positions))
        mask = slot_mask(positions, cache.k.shape[1])  # [B, T, S]
        return self._attend(q, cache.k, cache.v, mask), cache
