"""DeepSeekMoE: shared experts plus fine-grained routed experts (V2 eq. 9, V3 eq. 12).

    h'_t = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)

The routed sum is computed three ways, held equal by tests:
  * `dropless`  - tokens sorted by expert, grouped matmuls (`jax.lax.ragged_dot` or our kernel);
  * `capacity`  - GShard-style fixed [E, C, D] buffers; per expert, assignments beyond the capacity
                  C = ceil(capacity_factor * M * K / E) are dropped, lowest affinity first (V2's
                  dropping rule, Sec. 2.2.3; the device-level variant lives in the expert-parallel
                  path, where a device is the unit of capacity);
  * `reference` - every expert on every token, weighted by a dense [M, E] gate matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import fp8_weights
from deepseek_jax.config import ModelConfig
from deepseek_jax.gate import Gate, Routing
from deepseek_jax.kernels.block_grouped_matmul import (
    block_gmm,
    block_layout,
    choose_block,
    combine,
    dispatch,
)
from deepseek_jax.kernels.grouped_matmul import grouped_matmul as kernel_grouped_matmul
from deepseek_jax.kernels.grouped_matmul import grouped_matmul_fp8
from deepseek_jax.layers import MLP, param
from deepseek_jax.sharding import expert_parallel


class MoEStats(NamedTuple):
    """Per-sequence routing statistics of one MoE layer (inputs to balance losses / bias update)."""

    expert_counts: jax.Array  # [B, E] tokens of each sequence routed to each expert
    score_sums: jax.Array  # [B, E] sum over tokens of per-token-normalised affinities s'
    group_counts: jax.Array  # [B, G] tokens of each sequence sent to each expert group
    dropped: jax.Array  # [] fraction of (token, expert) assignments dropped (capacity path)
    tokens: jax.Array  # [B] tokens counted per sequence (non-padding)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, fp8: bool = False):
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] -> [M, N].

    Dispatches to kernels/grouped_matmul.py: the Pallas kernel on GPU, `jax.lax.ragged_dot`
    elsewhere; `fp8` quantises x (1x128) and w (128x128 per expert) as in the V3 recipe.
    """
    if isinstance(w, fp8_weights.Fp8Weight):  # stored FP8 serving weights
        return fp8_weights.grouped_matmul(x, w, group_sizes)
    if fp8:
        return grouped_matmul_fp8(x, w, group_sizes, out_dtype=x.dtype)
    return kernel_grouped_matmul(x, w, group_sizes)


def _swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, fp8=False):
    h = jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes, fp8)) * grouped_matmul(
        xs, w_up, group_sizes, fp8
    )
    return grouped_matmul(h, w_down, group_sizes, fp8)


def routed_dropless(
    x: jax.Array, r: Routing, w_gate, w_up, w_down, fp8: bool = False, gmm: str = "auto"
) -> jax.Array:
    """Sort-based dropless routed experts.

    Args:
      x: [M, D] tokens; r: routing with weights/experts [M, K].
      w_gate, w_up: [E, D, F]; w_down: [E, F, D], in x.dtype or FP32 master weights (the
        blocked path then returns FP32 weight gradients, V3 Sec. 3.3.3).
      fp8: V3 FP8 recipe (always the grouped kernels, as are stored `Fp8Weight` experts).
      gmm: "blocked" (kernels/block_grouped_matmul.py: tiles of one expert, routed FLOPs plus
        padding), "grouped" (`grouped_matmul`: ragged_dot / Pallas) or "auto" (blocked on CPU,
        where XLA's ragged_dot costs about E times the routed FLOPs; grouped elsewhere).
    Returns:
      [M, D] the gated sum over each token's K experts.
    """
    if gmm not in ("auto", "blocked", "grouped"):
        raise ValueError(f"routed_dropless: {gmm=} must be one of auto, blocked, grouped")
    if gmm == "auto":
        gmm = "blocked" if jax.default_backend() == "cpu" else "grouped"
    stored_fp8 = isinstance(w_gate, fp8_weights.Fp8Weight)
    if gmm == "blocked" and not fp8 and not stored_fp8:
        # Stored FP8 serving weights always take the grouped kernels, which dequantise per tile.
        return routed_blocked(x, r, w_gate, w_up, w_down)
    if not stored_fp8:  # the grouped kernels take weights in the compute dtype
        w_gate, w_up, w_down = (w.astype(x.dtype) for w in (w_gate, w_up, w_down))
    M, K = r.experts.shape
    E = w_gate.shape[0]
    flat = r.experts.reshape(-1)  # [M*K]
    order = jnp.argsort(flat, stable=True)  # assignment ids sorted by expert
    xs = x[order // K]  # [M*K, D]
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    ys = _swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, fp8)  # [M*K, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(M, K, -1)  # [M, K, D] unsorted
    return jnp.einsum("mkd,mk->md", y, r.weights.astype(y.dtype))


def routed_blocked(x: jax.Array, r: Routing, w_gate, w_up, w_down) -> jax.Array:
    """Dropless routed experts as block-sparse tile products (same contract as routed_dropless).

    FP32 (master) weights stay FP32 here: `block_gmm` casts each tile's weight to x.dtype and
    accumulates the weight gradient in FP32, so a BF16-compute step never rounds dW to BF16.
    """
    w_gate, w_up, w_down = (
        w if w.dtype == jnp.float32 else w.astype(x.dtype) for w in (w_gate, w_up, w_down)
    )
    M, K = r.experts.shape
    E, F = w_gate.shape[0], w_gate.shape[2]
    layout = block_layout(r.experts.reshape(-1), E, choose_block(M * K, E))
    xs = dispatch(x, layout, K)  # [P, D], P = tiles * block, rows of one expert per tile
    w_gate_up = jnp.concatenate([w_gate, w_up], axis=-1)  # [E, D, 2F]: one product for both
    gate, up = jnp.split(block_gmm(xs, w_gate_up, layout), [F], axis=-1)  # [P, F]
    ys = block_gmm(jax.nn.silu(gate) * up, w_down, layout)  # [P, D]
    return combine(ys, r.weights, layout)  # [M, D]


def expert_capacity(num_tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert: ceil(capacity_factor * M * K / E)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * K / E))


def routed_capacity(
    x: jax.Array,
    r: Routing,
    w_gate,
    w_up,
    w_down,
    capacity: int,
    *,
    fp8: bool = False,
    token_mask: jax.Array | None = None,
):
    """Fixed-capacity routed experts; returns ([M, D] output, kept mask [M, K]).

    V2 Sec. 2.2.3 drops "the tokens with the lowest affinity scores": within each expert the
    assignments are ranked by the raw affinity s_{i,t} (r.scores), not by the normalised and
    scaled gating weight g_{i,t}, which divides by a per-token sum and so reorders tokens.
    Padding (`token_mask` False) takes no slot and is not reported as kept.

    Args:
      x: [M, D]; r: routing (weights/experts [M, K], scores [M, E]).
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].
      capacity: C slots per expert.
      fp8: run the [E, C, D] buffers through the FP8 grouped matmul (V3 Sec. 3.3: 1x128
        activation tiles, 128x128 weight blocks per expert), as the dropless path does.
      token_mask: [M] bool, False on padding; None = every token is real.
    """
    M, K = r.experts.shape
    E = w_gate.shape[0]
    flat_e = r.experts.reshape(-1)  # [M*K]
    affinity = jnp.take_along_axis(r.scores, r.experts, axis=-1).reshape(-1)  # [M*K] raw s
    real = jnp.ones((M * K,), bool)
    if token_mask is not None:
        real = jnp.repeat(token_mask.reshape(M).astype(bool), K)  # [M*K]
    # Within each expert: real tokens first, highest affinity first; overflow drops the rest.
    order = jnp.lexsort((-affinity, ~real, flat_e))  # [M*K]
    sorted_e = flat_e[order]
    counts = jnp.bincount(flat_e, length=E)
    slot = jnp.arange(M * K) - (jnp.cumsum(counts) - counts)[sorted_e]  # position in its expert
    keep_sorted = (slot < capacity) & real[order]
    slot = jnp.where(keep_sorted, slot, capacity)  # out of range -> dropped by the scatter
    buf = jnp.zeros((E, capacity, x.shape[-1]), x.dtype)
    buf = buf.at[sorted_e, slot].set(x[order // K], mode="drop")  # [E, C, D]
    if fp8:  # the buffers are E groups of C rows: the grouped FP8 kernel applies as is
        rows = buf.reshape(E * capacity, -1)  # [E*C, D]
        out = _swiglu_grouped(rows, w_gate, w_up, w_down, jnp.full((E,), capacity, jnp.int32), True)
        out = out.reshape(E, capacity, -1)  # [E, C, D]
    else:
        h = jnp.einsum("ecd,edf->ecf", buf, w_gate)
        h = jax.nn.silu(h) * jnp.einsum("ecd,edf->ecf", buf, w_up)  # [E, C, F]
        out = jnp.einsum("ecf,efd->ecd", h, w_down)  # [E, C, D]
    ys = out.at[sorted_e, slot].get(mode="fill", fill_value=0)  # [M*K, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(M, K, -1)
    keep = jnp.zeros((M * K,), bool).at[order].set(keep_sorted).reshape(M, K)
    return jnp.einsum("mkd,mk->md", y, r.weights.astype(y.dtype)), keep


def routed_reference(x: jax.Array, r: Routing, w_gate, w_up, w_down) -> jax.Array:
    """Every expert on every token, weighted by the dense gate matrix [M, E] (test reference)."""
    E = w_gate.shape[0]
    dense_w = jnp.zeros((x.shape[0], E), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], r.experts].add(r.weights)  # [M, E]
    h = jax.nn.silu(jnp.einsum("md,edf->mef", x, w_gate)) * jnp.einsum("md,edf->mef", x, w_up)
    y = jnp.einsum("mef,efd->med", h, w_down)  # [M, E, D]
    return jnp.einsum("med,me->md", y, dense_w.astype(y.dtype))


class MoE(nnx.Module):
    """Shared experts + gate + routed experts [E, D, F] (experts stacked for grouped matmuls)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Gate(cfg, rngs=rngs)
        self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.w_up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.w_down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), cfg)
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, F * cfg.n_shared_experts, rngs=rngs)
        else:
            self.shared = None

    def __call__(
        self, x: jax.Array, token_mask: jax.Array | None = None, *, impl: str | None = None
    ) -> tuple[jax.Array, MoEStats]:
        """x [B, T, D] -> (output [B, T, D], per-sequence routing stats).

        `impl` overrides cfg.moe_impl ("dropless" | "capacity" | "reference"), or picks an
        expert-parallel path ("ep" | "ep_ragged" | "ep_ragged_emulated" | "ep_capacity").
        """
        cfg = self.cfg
        B, T, D = x.shape
        # ---- expert parallelism (sharding/expert_parallel.py) -------------------------------
        # impl "ep*", or no impl under sharding rules and a mesh that splits tokens or experts:
        # route and run the routed experts under shard_map (all-to-all dispatch / combine).
        stored_fp8 = isinstance(self.w_gate[...], fp8_weights.Fp8Weight)
        if impl in expert_parallel.EP_IMPLS or (impl is None and expert_parallel.ep_active()):
            if stored_fp8:
                raise ValueError(
                    "MoE: FP8 serving weights run only with moe_impl='dropless' on one device; "
                    f"got impl={impl!r} under expert parallelism"
                )
            ws = [w[...].astype(cfg.compute_dtype) for w in (self.w_gate, self.w_up, self.w_down)]
            exchange = expert_parallel.exchange_for_impl(impl or "ep", cfg)
            routed, r, dropped = expert_parallel.expert_parallel_routed(
                self.gate, x, *ws, cfg, exchange=exchange, token_mask=token_mask
            )
            out = routed if self.shared is None else routed + self.shared(x)
            return out.astype(x.dtype), self._stats(r, B, T, token_mask, dropped)
        # ---- end expert parallelism -----------------------------------------------------------
        impl = impl or cfg.moe_impl
        xf = x.reshape(B * T, D)  # [M, D]
        r = self.gate(xf)
        dt = cfg.compute_dtype
        xc = xf.astype(dt)
        ws = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if stored_fp8:  # the grouped FP8 GEMM consumes the stored blocks (fp8_weights.py)
            if impl != "dropless":
                raise ValueError(f"MoE: FP8 serving weights need moe_impl='dropless', got {impl!r}")
        elif impl != "dropless":  # routed_dropless casts itself; its CPU path keeps FP32 dW
            ws = tuple(w.astype(dt) for w in ws)
        dropped = jnp.zeros((), jnp.float32)
        if impl == "dropless":
            routed = routed_dropless(xc, r, *ws, fp8=cfg.fp8)
        elif impl == "capacity":
            tm = None if token_mask is None else token_mask.reshape(B * T)
            routed, keep = routed_capacity(
                xc, r, *ws, expert_capacity(B * T, cfg), fp8=cfg.fp8, token_mask=tm
            )
            real = (
                jnp.ones((B * T, 1), jnp.float32) if tm is None else tm.astype(jnp.float32)[:, None]
            )
            # the fraction of *real* (token, expert) assignments that found no slot
            dropped = 1.0 - keep.sum(dtype=jnp.float32) / jnp.maximum(real.sum() * keep.shape[1], 1)
        elif impl == "reference":
            if cfg.fp8:  # a test oracle in the compute dtype: never a silent BF16 fallback
                raise ValueError(
                    "MoE impl='reference' runs the routed experts in ModelConfig.dtype and cannot "
                    "honour ModelConfig.fp8=True; use impl='dropless' or 'capacity'"
                )
            routed = routed_reference(xc, r, *ws)
        else:
            raise ValueError(f"MoE impl={impl!r}: allowed dropless, capacity, reference")
        out = routed.reshape(B, T, D)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.astype(x.dtype), self._stats(r, B, T, token_mask, dropped)

    def _stats(self, r: Routing, B: int, T: int, token_mask, dropped) -> MoEStats:
        cfg = self.cfg
        E, G = cfg.n_routed_experts, cfg.n_group
        mask = (
            jnp.ones((B, T), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
        )
        chosen = jax.nn.one_hot(r.experts, E, dtype=jnp.float32).sum(1).reshape(B, T, E)
        chosen = chosen * mask[..., None]  # [B, T, E] in {0, 1}
        normed = r.scores / r.scores.sum(-1, keepdims=True)  # s' (softmax is already normalised)
        normed = normed.reshape(B, T, E) * mask[..., None]
        in_group = chosen.reshape(B, T, G, E // G).max(-1)  # [B, T, G]
        return MoEStats(
            expert_counts=chosen.sum(1),
            score_sums=normed.sum(1),
            group_counts=in_group.sum(1),
            dropped=dropped,
            tokens=mask.sum(1),
        )
