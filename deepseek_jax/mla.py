"""Multi-head Latent Attention (DeepSeek-V2 report Sec. 2.1, eq. 9-19; V3 eq. 1-11).

    c_t^KV = W^DKV h_t                      (eq. 9,  joint KV compression, C = kv_lora_rank)
    k_t^C, v_t^C = W^UK c_t^KV, W^UV c_t^KV (eq. 10-11)
    c_t^Q = W^DQ h_t;  q_t^C = W^UQ c_t^Q    (eq. 12-13, optional: V2-Lite has no q_lora_rank)
    q_t^R = RoPE(W^QR c_t^Q);  k_t^R = RoPE(W^KR h_t)   (eq. 14-15, one rope key shared by heads)
    o_t,i = sum_j softmax_j(q_t,i . k_j,i / sqrt(d_h + d_h^R)) v_j,i^C   (eq. 17-18)

Weights (JAX layout, head axes explicit): wq_a [D, Q] + q_norm + wq_b [Q, N, H] (or wq [D, N, H]),
wkv_a [D, C + R] (W^DKV and W^KR fused, as in the checkpoints), kv_norm [C],
wkv_b [C, N, nope + v] (W^UK and W^UV fused), wo [N, v, D].

Two paths:
  * `__call__` - training/prefill: expand K and V per head from the latent;
  * `decode`   - the latent-cache path: caches only [c_kv ; k_rope] (C + R values per token),
    folds W^UK into the query (q_lat = q_nope W^UK^T, so q.k^C = q_lat . c^KV) and applies W^UV
    after attending over the latents (V2 Sec. 2.1.2, "absorb").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.decode_cache import slot_mask, write_slots
from deepseek_jax.layers import linear, param
from deepseek_jax.norm import RMSNorm
from deepseek_jax.rope import apply_rope, rope_tables

_NEG = -1e30  # finite "minus infinity" keeps fully-masked rows NaN-free
# The latent norms use a fixed eps in DeepSeek's reference code and in every checkpoint's
# modelling code, independent of rms_norm_eps.
_LATENT_EPS = 1e-6


class LatentCache(NamedTuple):
    """Per-layer latent KV cache: only C + R values per token."""

    c_kv: jax.Array  # [B, S, C] normalised KV latent
    k_rope: jax.Array  # [B, S, R] rotated shared rope key


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> LatentCache:
    return LatentCache(
        jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
        jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype),
    )


def attention_mask(segment_ids: jax.Array | None, T: int) -> jax.Array:
    """Causal mask [B or 1, T, T], restricted to same-segment pairs for packed sequences."""
    causal = jnp.tril(jnp.ones((T, T), bool))[None]  # [1, T, S]
    if segment_ids is None:
        return causal
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return causal & same


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, C, R = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
        )
        H = cfg.qk_head_dim
        if cfg.q_lora_rank is not None:
            Q = cfg.q_lora_rank
            self.wq_a = param(rngs, (D, Q), ("embed", "q_lora"), cfg)
            self.q_norm = RMSNorm(Q, eps=_LATENT_EPS, param_dtype=cfg.weight_dtype)
            self.wq_b = param(rngs, (Q, N, H), ("q_lora", "heads", "head_dim"), cfg)
            self.wq = None
        else:
            self.wq_a = self.q_norm = self.wq_b = None
            self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg)
        self.wkv_a = param(rngs, (D, C + R), ("embed", "kv_lora"), cfg)
        self.kv_norm = RMSNorm(C, eps=_LATENT_EPS, param_dtype=cfg.weight_dtype)
        self.wkv_b = param(
            rngs,
            (C, N, cfg.qk_nope_head_dim + cfg.v_head_dim),
            ("kv_lora", "heads", "head_dim"),
            cfg,
        )
        self.wo = param(rngs, (N, cfg.v_head_dim, D), ("heads", "head_dim", "embed"), cfg)

    # ---- shared projections -------------------------------------------------------------
    def _queries(self, x, cos, sin):
        """x [B, T, D] -> q_nope [B, T, N, nope], q_rope [B, T, N, R] (eq. 12-14)."""
        cfg = self.cfg
        if self.wq is None:
            c_q = self.q_norm(linear(x, self.wq_a[...], cfg))  # [B, T, Q]
            q = linear(c_q, self.wq_b[...], cfg)  # [B, T, N, H]
        else:
            q = linear(x, self.wq[...], cfg)  # [B, T, N, H]
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_rope, cos, sin, interleaved=cfg.rope_interleave)

    def _latents(self, x, cos, sin):
        """x [B, T, D] -> c_kv [B, T, C] (normalised), k_rope [B, T, R] (eq. 9, 15)."""
        cfg = self.cfg
        kv = linear(x, self.wkv_a[...], cfg)  # [B, T, C + R]
        c_kv, k_rope = jnp.split(kv, [cfg.kv_lora_rank], axis=-1)
        k_rope = apply_rope(k_rope, cos, sin, interleaved=cfg.rope_interleave)
        return self.kv_norm(c_kv), k_rope

    def _softmax(self, scores, mask):
        """scores [B, N, T, S] fp32, mask broadcastable [B, 1, T, S] -> probabilities."""
        scores = jnp.where(mask, scores * self.cfg.softmax_scale, _NEG)
        return jax.nn.softmax(scores, axis=-1)

    # ---- training / prefill path -----------------------------------------------------------
    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Full-sequence attention with expanded K/V.

        Args:
          x: [B, T, D]; positions: [B, T] int32 (restart per packed document);
          segment_ids: [B, T] document ids of packed sequences, or None.
        Returns:
          [B, T, D].
        """
        cfg = self.cfg
        B, T, _ = x.shape
        cos, sin = rope_tables(cfg, positions)
        q_nope, q_rope = self._queries(x, cos, sin)
        c_kv, k_rope = self._latents(x, cos, sin)
        kv = linear(c_kv, self.wkv_b[...], cfg)  # [B, S, N, nope + v]  (eq. 10-11)
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        scores = jnp.einsum("btnh,bsnh->bnts", q_nope, k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=jnp.float32)
        probs = self._softmax(scores, attention_mask(segment_ids, T)[:, None])  # [B, N, T, S]
        out = jnp.einsum("bnts,bsnv->btnv", probs.astype(v.dtype), v)  # [B, T, N, v]
        return linear(out, self.wo[...], cfg, in_dims=2)  # [B, T, D]

    # ---- latent-cache (absorbed) path ---------------------------------------------------------
    def decode(
        self, x: jax.Array, positions: jax.Array, cache: LatentCache
    ) -> tuple[jax.Array, LatentCache]:
        """Writes T new tokens at slots `positions` of their rows, then attends over the latents.

        Slot index == position; the query at position p sees slots s <= p of its own row.

        Args:
          x: [B, T, D] new tokens (T = prompt length for prefill, 1 per decode step);
          positions: [B, T] int32 their positions (= cache slots); cache: LatentCache, S slots.
        Returns:
          ([B, T, D], updated cache).
        """
        cfg = self.cfg
        cos, sin = rope_tables(cfg, positions)
        q_nope, q_rope = self._queries(x, cos, sin)
        c_new, k_new = self._latents(x, cos, sin)
        cache = LatentCache(
            write_slots(cache.c_kv, c_new, positions), write_slots(cache.k_rope, k_new, positions)
        )
        wkv_b = self.wkv_b[...].astype(cfg.compute_dtype)
        w_uk, w_uv = jnp.split(wkv_b, [cfg.qk_nope_head_dim], axis=-1)  # [C, N, nope], [C, N, v]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)  # W^UK absorbed into q  [B, T, N, C]
        c_kv = cache.c_kv.astype(q_lat.dtype)
        scores = jnp.einsum("btnc,bsc->bnts", q_lat, c_kv, preferred_element_type=jnp.float32)
        scores += jnp.einsum(
            "btnr,bsr->bnts",
            q_rope,
            cache.k_rope.astype(q_rope.dtype),
            preferred_element_type=jnp.float32,
        )
        mask = slot_mask(positions, cache.c_kv.shape[1])  # [B, T, S]
        probs = self._softmax(scores, mask[:, None])  # [B, N, T, S]
        out_lat = jnp.einsum("bnts,bsc->btnc", probs.astype(c_kv.dtype), c_kv)  # [B, T, N, C]
        out = jnp.einsum("btnc,cnv->btnv", out_lat, w_uv)  # W^UV after attention  [B, T, N, v]
        return linear(out, self.wo[...], cfg, in_dims=2), cache
