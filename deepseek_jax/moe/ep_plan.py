"""The plans of the expert-parallel exchanges: pure functions of one device's local data (and of
all-gathered counts), tested on their own; `expert_parallel.py` runs them under `shard_map`.

  * sizes: `capacity_sizes` (the device-level exchange's budget and blocks), `ragged_buffer_rows`;
  * V2's device-level dropping rule (Sec. 2.2.3): `priority` (raw affinity, never-dropped
    sequences first, padding last), `protected_sequences` (Sec. 2.3), `device_keep`;
  * layouts: `capacity_layout` (slots of the fixed send blocks), `ragged_plan` (offsets and sizes
    of the ragged all-to-alls) and `ragged_all_to_all_emulated` (the collective for XLA:CPU).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.moe.dispatch import capacity_slots
from deepseek_jax.moe.router import Routing

PROTECT = 2.0  # added to a never-dropped token's affinity (affinities lie in [0, 1])


class CapacitySizes(NamedTuple):
    """Static sizes of the device-level capacity exchange (per device of an EP group)."""

    budget: int  # C: assignments a device accepts, ceil(capacity_factor * M_l * K)
    pair_rows: int  # R: most assignments one source can route to one device, M_l min(K, E/P)
    send_rows: int  # rows per (source, destination) block of the data exchange, <= R
    recv_rows: int  # rows a device computes: max(C, protected ones that may arrive), <= P R

    def never_overflows(self, ep_size: int) -> bool:
        """C >= P R: every source may send a device all it routes there, nothing can drop (the
        ragged exchange then sends (token, device) pairs, `_ragged_dropless_exchange`)."""
        return self.budget >= ep_size * self.pair_rows


def capacity_sizes(
    tokens: int,
    cfg: ModelConfig,
    ep_size: int,
    protected_tokens: int = 0,
    *,
    budget: int | None = None,
) -> CapacitySizes:
    """Sizes of the device-level dropping exchange for M_l = `tokens` per device.

    A device keeps at most max(C, protected arrivals) assignments, so no source sends it more:
    the data blocks need min(R, that) rows and are never overflowed. `protected_tokens` is the
    most never-dropped tokens one source holds. `budget`: C, default ceil(capacity_factor M_l K)
    (the capacity exchange); the ragged exchange passes its `ragged_buffer_rows`.
    """
    K, E_l = cfg.num_experts_per_tok, cfg.n_routed_experts // ep_size
    R = tokens * min(K, E_l)
    if budget is None:
        budget = max(1, math.ceil(cfg.capacity_factor * tokens * K))
    recv = min(ep_size * R, max(budget, ep_size * protected_tokens * min(K, E_l)))
    return CapacitySizes(budget, R, min(R, recv), recv)


def protected_sequences(batch: int, share: float) -> np.ndarray:
    """[B] bool: the sequences whose tokens are never dropped (V2 Sec. 2.3, "approximately
    10% of the training sequences"): every 1/share-th sequence, spread over the batch (and so
    over its shards), floor(B share) of them."""
    b = np.arange(batch)
    return np.floor((b + 1) * share) > np.floor(b * share)


def device_keep(priority: jax.Array, budget: int, *, hard: bool = False) -> jax.Array:
    """V2's device-level rule on one receiving device: which arriving assignments stay.

    Args:
      priority: [P, R] for each source's assignments to this device: the raw affinity s, plus
        `PROTECT` for never-dropped sequences, -inf where nothing was sent.
      budget: C, assignments this device accepts.
      hard: C is the size of a buffer (the ragged exchange's): protected rows rank first but
        nothing past C stays. Else every protected row stays, whatever C.
    Returns:
      [P, R] bool: the C highest priorities (ties: lower source, then earlier slot) and, unless
      `hard`, every protected one; nothing that was not sent.
    """
    flat = priority.reshape(-1)  # [P R]
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0]))
    within = rank < budget
    keep = jnp.isfinite(flat) & (within if hard else within | (flat >= PROTECT))
    return keep.reshape(priority.shape)


def ragged_buffer_rows(
    tokens: int, cfg: ModelConfig, ep_size: int, factor: float | None = None
) -> int:
    """The ragged exchange's budget C: the assignments a device accepts.

    A token sends at most min(K, E/P) assignments to one device, so P M_l min(K, E/P) never overflow
    (factor None). That budget selects the dropless exchange, which receives (token, device) pairs,
    at most P M_l rows, but still runs up to P M_l min(K, E/P) expert rows (for V3 on EP64, 15 GiB
    of bf16 rows). At scale a `factor` (e.g. 2: twice the mean load, which the bias-balanced router
    stays under) bounds it, and C is then the receive rows and the budget of V2's device-level
    dropping (Sec. 2.2.3): over it, the lowest-affinity arrivals across all sources are dropped
    (never a protected sequence's) and counted in MoEStats.dropped.
    """
    E_l = cfg.n_routed_experts // ep_size
    worst = ep_size * tokens * min(cfg.num_experts_per_tok, E_l)
    if factor is None:
        return worst
    return min(worst, max(1, math.ceil(factor * tokens * cfg.num_experts_per_tok)))


def priority(r: Routing, klass) -> jax.Array:
    """[M, K] dropping priority of each assignment (V2 Sec. 2.2.3): the raw affinity s_{i,t}
    (V2 drops "the tokens with the lowest affinity scores", not by the normalised, scaled gating
    weight), plus `PROTECT` for a never-dropped sequence's, -inf for padding (never sent).

    klass [M]: 0 padding, 1 a token, 2 a token of a never-dropped sequence.
    """
    K = r.experts.shape[1]
    affinity = jax.lax.stop_gradient(jnp.take_along_axis(r.scores, r.experts, axis=-1))  # [M, K]
    k = jnp.repeat(klass[:, None], K, axis=1)  # [M, K]
    prio = jnp.where(k == 2, affinity + PROTECT, affinity)
    return jnp.where(k == 0, -jnp.inf, prio)


def capacity_layout(dest: jax.Array, weights: jax.Array, n_dev: int, capacity: int):
    """Slots of a [P, C] send buffer for each assignment, by destination then priority.

    The single-device capacity slotting (`dispatch.capacity_slots`) with devices for experts.

    Args:
      dest: [M, K] destination device of each (token, expert) assignment.
      weights: [M, K] priorities: within a device, a higher one gets the earlier slot.
      n_dev: P, devices in the EP group; capacity: C, slots per destination device.
    Returns:
      (order [M*K] assignment ids sorted by destination, then by descending weight;
       sorted_dest [M*K] their destinations; slot [M*K] their slots, C where dropped;
       keep [M, K] whether each assignment got a slot).
    """
    M, K = dest.shape
    order, sorted_dest, slot, keep_sorted = capacity_slots(
        dest.reshape(-1), weights.reshape(-1), n_dev, capacity
    )
    keep = jnp.zeros((M * K,), bool).at[order].set(keep_sorted).reshape(M, K)
    return order, sorted_dest, slot, keep


class RaggedPlan(NamedTuple):
    """Offsets and sizes of one device's two ragged all-to-alls (all [P] int32 unless noted)."""

    input_offsets: jax.Array  # start of my rows for device p in my expert-sorted rows
    send_sizes: jax.Array  # rows I send to p
    output_offsets: jax.Array  # where those rows land in p's buffer
    recv_sizes: jax.Array  # rows I receive from source q
    recv_offsets: jax.Array  # where q's rows start in my buffer
    return_offsets: jax.Array  # where my results for q land in q's expert-sorted rows
    recv_expert: jax.Array | None  # [N] local expert of each buffer row (E/P: empty row)


def ragged_plan(counts: jax.Array, me: jax.Array, buffer_rows: int) -> RaggedPlan:
    """Plans the ragged exchange from every device's per-expert counts of the rows it sends.

    Each device sorts the rows it sends by expert (so by destination: experts are contiguous
    per device), and each receiver stacks its sources' rows in source order. The plan is a pure
    function of the all-gathered counts, so no sizes need their own all-to-all.

    Args:
      counts: [P, E] rows device q sends to expert e (the same array on every device); what
        arrives at one device must fit its buffer: `_ragged_exchange` drops before it plans.
      me: [] this device's index on the expert axis.
      buffer_rows: N, rows of the receive buffer.
    Returns:
      The RaggedPlan of device `me`.
    """
    n_dev, E = counts.shape
    E_l = E // n_dev
    # The rows I receive are source-major, expert-minor (each source sorted by expert).
    mine = jax.lax.dynamic_slice_in_dim(counts, me * E_l, E_l, axis=1)  # [src, E_l]
    ends = jnp.cumsum(mine.reshape(-1))  # [src * E_l]
    seg = jnp.searchsorted(ends, jnp.arange(buffer_rows), side="right")  # [N]
    recv_expert = jnp.where(seg < n_dev * E_l, seg % E_l, E_l).astype(jnp.int32)
    plan = device_plan(counts.reshape(n_dev, n_dev, E_l).sum(-1), me)
    return plan._replace(recv_expert=recv_expert)


def device_plan(dev: jax.Array, me: jax.Array) -> RaggedPlan:
    """The offsets and sizes of `ragged_plan` from [src, dst] row counts (`recv_expert` None):
    each source's rows sorted by destination, each receiver's stacked in source order."""
    at_dst = jnp.cumsum(dev, axis=0) - dev  # [src, dst] offset of src's rows in dst's buffer
    at_src = jnp.cumsum(dev, axis=1) - dev  # [src, dst] offset of dst's rows in src's rows
    i32 = lambda a: a.astype(jnp.int32)
    return RaggedPlan(
        input_offsets=i32(at_src[me]),
        send_sizes=i32(dev[me]),
        output_offsets=i32(at_dst[me]),
        recv_sizes=i32(dev[:, me]),
        recv_offsets=i32(at_dst[:, me]),
        return_offsets=i32(at_src[:, me]),
        recv_expert=None,
    )


def ragged_all_to_all_emulated(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` built from all-gathers, for backends without it (XLA:CPU).

    Same arguments and result; every device gathers all operands (P times the traffic of the
    real collective), so it is for tests and CPU runs, not for measuring communication.
    """
    del recv_sizes  # implied by the senders' sizes, as in the real collective
    ops = jax.lax.all_gather(operand, axis_name)  # [P, N, ...]
    starts = jax.lax.all_gather(input_offsets, axis_name)  # [src, dst]
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    lands = jax.lax.all_gather(output_offsets, axis_name)
    me = jax.lax.axis_index(axis_name)
    n_src, n = ops.shape[:2]
    j = jnp.arange(n)[None, :]  # [1, N] row within a sent slice
    valid = j < sizes[:, me][:, None]  # [src, N]
    src_row = jnp.clip(starts[:, me][:, None] + j, 0, n - 1)
    dst_row = jnp.where(valid, lands[:, me][:, None] + j, output.shape[0])  # OOB -> dropped
    rows = ops[jnp.arange(n_src)[:, None], src_row]  # [src, N, ...]
    flat = rows.reshape((n_src * n,) + operand.shape[1:])
    return output.at[dst_row.reshape(-1)].set(flat, mode="drop")
