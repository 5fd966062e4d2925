"""Dispatch plans of the routed experts on one device: which rows each expert computes.

* `routed_dropless` - (token, expert) assignments sorted by expert, grouped matmuls
                      (or `routed_blocked`: block-sparse tiles of one expert, on CPU);
* `routed_capacity` - GShard-style fixed [E, C, D] buffers filled by `capacity_slots`; per
                      expert, assignments beyond C = ceil(capacity_factor * M * K / E) are
                      dropped, lowest affinity first (V2 Sec. 2.2.3). The expert-parallel
                      capacity exchange slots its per-device send buffers the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from deepseek_jax import fp8_weights
from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.block_grouped_matmul import (
    block_gmm,
    block_gmm_fp8,
    block_layout,
    choose_block,
    combine,
    dispatch,
)
from deepseek_jax.moe.experts import swiglu_buffers, swiglu_grouped
from deepseek_jax.moe.router import Routing


def routed_dropless(
    x: jax.Array, r: Routing, w_gate, w_up, w_down, fp8: bool = False, gmm: str = "auto"
) -> jax.Array:
    """Sort-based dropless routed experts.

    Args:
      x: [M, D] tokens; r: routing with weights/experts [M, K].
      w_gate, w_up: [E, D, F]; w_down: [E, F, D], in x.dtype or FP32 master weights (the
        blocked path then returns FP32 weight gradients, V3 Sec. 3.3.3).
      fp8: V3 FP8 recipe (Sec. 3.3), blocked or grouped alike; stored `Fp8Weight` serving
        experts run their forward product on either plan.
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
    if gmm == "blocked":
        return routed_blocked(x, r, w_gate, w_up, w_down, fp8=fp8)
    # `grouped_matmul` (FP8 or not) takes FP32 master weights itself and returns FP32 dW
    M, K = r.experts.shape
    E = w_gate.shape[0]
    flat = r.experts.reshape(-1)  # [M*K]
    order = jnp.argsort(flat, stable=True)  # assignment ids sorted by expert
    xs = x[order // K]  # [M*K, D]
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    ys = swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, fp8)  # [M*K, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(M, K, -1)  # [M, K, D] unsorted
    return jnp.einsum("mkd,mk->md", y, r.weights.astype(y.dtype))


def routed_blocked(x: jax.Array, r: Routing, w_gate, w_up, w_down, fp8: bool = False) -> jax.Array:
    """Dropless routed experts as block-sparse tile products (same contract as routed_dropless).

    FP32 (master) weights stay FP32 here: `block_gmm` casts each tile's weight to x.dtype and
    accumulates the weight gradient in FP32, so a BF16-compute step never rounds dW to BF16.
    `fp8`: the products follow the V3 FP8 recipe (`block_gmm_fp8`), the gate and up weights
    quantized apart, as `grouped_matmul_fp8` does. Stored `Fp8Weight` experts (serving) run the
    same forward products with their stored blocks (`fp8_weights.block_grouped_matmul`).
    """
    stored = isinstance(w_gate, fp8_weights.Fp8Weight)  # FP8 serving weights (forward only)
    if not stored:
        w_gate, w_up, w_down = (
            w if w.dtype == jnp.float32 else w.astype(x.dtype) for w in (w_gate, w_up, w_down)
        )
    M, K = r.experts.shape
    E, F = w_gate.shape[0], w_gate.shape[2]
    layout = block_layout(r.experts.reshape(-1), E, choose_block(M * K, E))
    xs = dispatch(x, layout, K)  # [P, D], P = tiles * block, rows of one expert per tile

    def product(a, ws):  # several weights (gate and up): one product, outputs side by side
        if stored:
            return fp8_weights.block_grouped_matmul(a, ws, layout)
        if fp8:  # each weight quantized on its own block grid
            return block_gmm_fp8(a, ws, layout)
        return block_gmm(a, ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=-1), layout)

    gate, up = jnp.split(product(xs, (w_gate, w_up)), [F], axis=-1)  # [P, F] each
    ys = product(jax.nn.silu(gate) * up, (w_down,))  # [P, D]
    return combine(ys, r.weights, layout)  # [M, D]


def expert_capacity(num_tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert: ceil(capacity_factor * M * K / E)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * K / E))


def capacity_slots(
    groups: jax.Array,
    priority: jax.Array,
    n_groups: int,
    capacity: int,
    real: jax.Array | None = None,
):
    """Slots of a [G, C] buffer for N assignments, by group then descending priority.

    Args:
      groups: [N] int group of each assignment (an expert, or a destination device).
      priority: [N] within a group, a higher one gets the earlier slot.
      n_groups: G; capacity: C slots per group.
      real: [N] bool, False on padding: it sorts last in its group and never keeps a slot;
        None = every assignment is real.
    Returns:
      (order [N] assignment ids sorted by group, then real first, then by descending priority;
       sorted_groups [N] their groups; slot [N] their slots, C where dropped;
       keep_sorted [N] whether each sorted assignment got a slot).
    """
    if real is None:
        order = jnp.lexsort((-priority, groups))
    else:
        order = jnp.lexsort((-priority, ~real, groups))
    sorted_groups = groups[order]
    counts = jnp.bincount(groups, length=n_groups)  # [G]
    slot = jnp.arange(groups.shape[0]) - (jnp.cumsum(counts) - counts)[sorted_groups]
    keep_sorted = slot < capacity
    if real is not None:
        keep_sorted = keep_sorted & real[order]
    slot = jnp.where(keep_sorted, slot, capacity)  # out of range: the scatters drop it
    return order, sorted_groups, slot, keep_sorted


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
    order, sorted_e, slot, keep_sorted = capacity_slots(flat_e, affinity, E, capacity, real)
    buf = jnp.zeros((E, capacity, x.shape[-1]), x.dtype)
    buf = buf.at[sorted_e, slot].set(x[order // K], mode="drop")  # [E, C, D]
    out = swiglu_buffers(buf, w_gate, w_up, w_down, fp8)  # [E, C, D]
    ys = out.at[sorted_e, slot].get(mode="fill", fill_value=0)  # [M*K, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(M, K, -1)
    keep = jnp.zeros((M * K,), bool).at[order].set(keep_sorted).reshape(M, K)
    return jnp.einsum("mkd,mk->md", y, r.weights.astype(y.dtype)), keep
