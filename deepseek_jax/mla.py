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
    """Per-layer latent KV cache: only C + R values per token; slot index == position.

    With an 8-bit cache (`init_cache(..., dtype=jnp.int8 | jnp.float8_e4m3fn)`) `c_kv` and
    `k_rope` hold quantised values and `c_scale` / `r_scale` one fp32 scale per token
    (value = stored * scale); for a full-precision cache the scales are None.
    """

    c_kv: jax.Array  # [B, S, C] normalised KV latent
    k_rope: jax.Array  # [B, S, R] rotated shared rope key
    c_scale: jax.Array | None = None  # [B, S] per-token scale of c_kv (8-bit caches)
    r_scale: jax.Array | None = None  # [B, S] per-token scale of k_rope (8-bit caches)


QUANTIZED_CACHE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _qmax(dtype) -> float:
    return 127.0 if jnp.dtype(dtype) == jnp.int8 else float(jnp.finfo(dtype).max)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> LatentCache:
    """An empty cache of `max_len` slots; an int8 / float8_e4m3fn `dtype` quantises per token."""
    c = jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype)
    r = jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype)
    if jnp.dtype(dtype) in QUANTIZED_CACHE_DTYPES:
        ones = jnp.ones((batch, max_len), jnp.float32)
        return LatentCache(c, r, ones, ones)
    return LatentCache(c, r)


def quantize_per_token(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """x [B, T, K] -> (8-bit values [B, T, K], fp32 scales [B, T]) with scale = amax / qmax."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)  # [B, T]
    scale = jnp.where(amax > 0, amax / _qmax(dtype), 1.0)
    q = xf / scale[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        q = jnp.round(q)
    return q.astype(dtype), scale


def write_cache(
    cache: LatentCache, c_new: jax.Array, k_new: jax.Array, positions: jax.Array
) -> LatentCache:
    """Scatters T new entries per row at slots `positions` [B, T]; slots outside [0, S) are
    dropped."""

    def put(buf, new):
        return write_slots(buf, new, positions)

    if cache.c_scale is None:
        return LatentCache(put(cache.c_kv, c_new), put(cache.k_rope, k_new))
    cq, cs = quantize_per_token(c_new, cache.c_kv.dtype)
    rq, rs = quantize_per_token(k_new, cache.k_rope.dtype)
    return LatentCache(
        put(cache.c_kv, cq), put(cache.k_rope, rq), put(cache.c_scale, cs), put(cache.r_scale, rs)
    )


def read_cache(cache: LatentCache, dtype) -> tuple[jax.Array, jax.Array]:
    """(c_kv [B, S, C], k_rope [B, S, R]) in `dtype`, dequantised for an 8-bit cache."""
    if cache.c_scale is None:
        return cache.c_kv.astype(dtype), cache.k_rope.astype(dtype)
    c = cache.c_kv.astype(jnp.float32) * cache.c_scale[..., None]
    r = cache.k_rope.astype(jnp.float32) * cache.r_scale[..., None]
    return c.astype(dtype), r.astype(dtype)


def attention_mask(segment_ids: jax.Array | None, T: int) -> jax.Array:
    """Causal mask [B or 1, T, T], restricted to same-segment pairs for packed sequences."""
    causal = jnp.tril(jnp.ones((T, T), bool))[None]  # [1, T, S]
    if segment_ids is None:
        return causal
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return causal & same


def causal_query_blocks(T: int) -> list[tuple[int, int]]:
    """Query rows [a, b) of a causal attention, attended block by block over keys [0, b) only.

    The blocks above the diagonal are all masked, so skipping them cuts the [T, T] score work
    (products, mask, softmax and their gradients) to (n + 1) / 2n of it for n blocks: 62.5% for
    4. The result is the same: a query's masked keys get probability 0 either way. Measured at
    the CPU comparison's shape (B 8, 4 heads, T 256), the attention core's forward plus backward
    took 0.57x the time (docs/benchmarks.md). n = 4 (or 2) blocks of at least 64 rows; one block
    below that, where the extra products cost more than they save.
    """
    for n in (4, 2):
        if T % n == 0 and T // n >= 64:
            c = T // n
            return [(i * c, (i + 1) * c) for i in range(n)]
    return [(0, T)]


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
        # q_t,i = [q^C; q^R], k_j,i = [k^C_j,i; k^R_j] (eq. 16-17): one product over d_h + d_h^R
        # (the shared k^R broadcast over heads), cheaper on CPU than two summed score tensors.
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, N, nope + R]
        k_rope = jnp.broadcast_to(
            k_rope[:, :, None], (*k_rope.shape[:2], q.shape[2], k_rope.shape[-1])
        )
        k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)  # [B, S, N, nope + R]
        mask = attention_mask(segment_ids, T)[:, None]  # [B or 1, 1, T, S]
        outs = []
        for a, b in causal_query_blocks(T):  # query rows [a, b) see keys [0, b) only
            scores = jnp.einsum(
                "btnh,bsnh->bnts", q[:, a:b], k[:, :b], preferred_element_type=jnp.float32
            )
            probs = self._softmax(scores, mask[:, :, a:b, :b])  # [B, N, b - a, b]
            outs.append(jnp.einsum("bnts,bsnv->btnv", probs.astype(v.dtype), v[:, :b]))
        out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]  # [B, T, N, v]
        return linear(out, self.wo[...], cfg, in_dims=2)  # [B, T, D]

    # ---- latent-cache (absorbed) path ---------------------------------------------------------
    def decode(
        self, x: jax.Array, positions: jax.Array, cache: LatentCache
    ) -> tuple[jax.Array, LatentCache]:
        """Attends T new tokens per row over the latent cache (slot index == position).

        Row b writes its new latents at slots `positions[b]` (a scatter; positions >= S are
        dropped) and the query at position p attends the slots s <= p of its own row. Rows of a
        ragged batch are right-padded: a padded token may write garbage beyond the row's length,
        which the row's next real token overwrites before any query can attend it.

        Args:
          x: [B, T, D] new tokens (T = prompt length for prefill, 1 per decode step);
          positions: [B, T] int32 their positions; cache: LatentCache with S slots.
        Returns:
          ([B, T, D], updated cache).
        """
        cfg = self.cfg
        S = cache.c_kv.shape[1]
        cos, sin = rope_tables(cfg, positions)
        q_nope, q_rope = self._queries(x, cos, sin)
        c_new, k_new = self._latents(x, cos, sin)
        cache = write_cache(cache, c_new, k_new, positions)  # write, then attend
        wkv_b = self.wkv_b[...].astype(cfg.compute_dtype)
        w_uk, w_uv = jnp.split(wkv_b, [cfg.qk_nope_head_dim], axis=-1)  # [C, N, nope], [C, N, v]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)  # W^UK absorbed into q  [B, T, N, C]
        c_kv, k_rope = read_cache(cache, q_lat.dtype)  # [B, S, C], [B, S, R]
        scores = jnp.einsum("btnc,bsc->bnts", q_lat, c_kv, preferred_element_type=jnp.float32)
        scores += jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=jnp.float32)
        mask = slot_mask(positions, S)  # [B, T, S] causal per row
        probs = self._softmax(scores, mask[:, None])  # [B, N, T, S]
        out_lat = jnp.einsum("bnts,bsc->btnc", probs.astype(c_kv.dtype), c_kv)  # [B, T, N, C]
        out = jnp.einsum("btnc,cnv->btnv", out_lat, w_uv)  # W^UV after attention  [B, T, N, v]
        return linear(out, self.wo[...], cfg, in_dims=2), cache
