"""Expert parallelism: the routed experts of DeepSeekMoE under `jax.shard_map`.

Tokens arrive split over the batch axes X (every data-like mesh axis, the expert axis included:
outside the routed experts EP ranks act as data-parallel ranks, as in DeepSeek's training). Each
device routes its own tokens, sends every (token, expert) assignment to the device that owns the
expert with an all-to-all over the `expert` axis (P devices, E/P experts each), runs its local
experts as one grouped matmul, sends the results back and forms the gated sum. Three exchanges:

  * `ragged`          - `jax.lax.ragged_all_to_all` moves exactly the assignments each device
                        routes (GPU/TPU; XLA:CPU has no ragged-all-to-all): dropless with the
                        worst-case receive buffer; with a smaller one (`buffer_factor`) a device
                        over its budget drops by V2's device-level rule below, not by source;
  * `ragged_emulated` - the same offsets and sizes, the transfer done by an all-gather (P times
                        the traffic) so that CPU runs and tests can hold the ragged plan exact;
  * `capacity`        - V2's device-level token dropping (Sec. 2.2.3) over fixed `all_to_all`
                        buffers: each receiving device has a budget of C = ceil(capacity_factor
                        M_l K) assignments (its mean load times the factor); when more arrive it
                        drops the lowest raw-affinity s_{i,t} ones across *all* sources, except
                        those of the ~10% of sequences that are never dropped
                        (`ModelConfig.never_drop_share`, V2 Sec. 2.3); padding is never sent.

Node-limited routing (V3 Sec. 2.1.2; V2's device-limited routing): the router's `n_group` expert
groups lie along the expert axis, group g on the contiguous devices [g P/G, (g+1) P/G) - a
"node" - so the group-limited router's `topk_group` caps the nodes a token reaches
(`nodes_per_token`). Expert counts leave the shard_map sharded over the batch, so every sum of
them (the bias update's load) is over the whole mesh, not one shard.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.moe.dispatch import routed_dropless
from deepseek_jax.moe.ep_plan import (
    CapacitySizes,
    capacity_layout,
    capacity_sizes,
    device_keep,
    device_plan,
    priority,
    protected_sequences,
    ragged_all_to_all_emulated,
    ragged_buffer_rows,
    ragged_plan,
)
from deepseek_jax.moe.experts import swiglu_grouped
from deepseek_jax.moe.router import Routing, route
from deepseek_jax.sharding.logical import MeshAxes, vary_over
from deepseek_jax.sharding.parallel import ParallelConfig, flat_axes

_flat = flat_axes


def _axis_arg(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return axes[0] if len(axes) == 1 else axes


class EPLayout(NamedTuple):
    """How the routed-expert block lies on the mesh (derived from the mesh and the rules)."""

    batch_axes: tuple[str, ...]  # X: mesh axes the tokens are split over
    expert_axes: tuple[str, ...]  # mesh axes the experts are split over (one EP group)
    ffn_axes: tuple[str, ...]  # mesh axes splitting an expert's hidden F (partial sums)
    embed_axes: tuple[str, ...]  # mesh axes splitting the weights' D (FSDP: gathered inside)
    batch_shards: int  # product of the batch axes' sizes
    ep_size: int  # P: devices per EP group

    @property
    def varying_axes(self) -> tuple[str, ...]:
        """Axes the expert computation varies over: tokens (batch) and F slices (ffn)."""
        return self.batch_axes + tuple(a for a in self.ffn_axes if a not in self.batch_axes)


def ep_layout(mesh_shape: Mapping[str, int], rules: Mapping[str, MeshAxes]) -> EPLayout:
    """Derives the EP layout and checks that the rules allow one.

    Args:
      mesh_shape: mesh axis name -> size.
      rules: the logical-axis table (`batch`, `experts`, `expert_mlp`, `embed` are read).
    Raises:
      ValueError naming the rule when an expert axis is not a batch axis (each EP rank must own
      distinct tokens) or when an expert's hidden dimension is split over a batch axis.
    """
    batch = tuple(a for a in _flat(rules.get("batch")) if a in mesh_shape)
    experts = _flat(rules.get("experts"))
    ffn = _flat(rules.get("expert_mlp"))
    embed = _flat(rules.get("embed"))
    for a in experts + ffn + embed:
        if a not in mesh_shape:
            raise ValueError(f"sharding rules: {a!r} (experts/expert_mlp/embed) is not a mesh axis")
    missing = [a for a in experts if a not in batch and mesh_shape[a] > 1]
    if missing:
        raise ValueError(
            f"sharding rules: 'experts' -> {experts} but 'batch' -> {batch} lacks {missing}; "
            "expert parallelism needs the tokens split over the expert axes too"
        )
    clash = [a for a in ffn if a in batch and mesh_shape[a] > 1]
    if clash:
        raise ValueError(
            f"sharding rules: 'expert_mlp' -> {ffn} uses batch axes {clash}; split F over an "
            "axis the tokens are replicated on (e.g. 'tensor')"
        )
    return EPLayout(
        batch_axes=batch,
        expert_axes=experts,
        ffn_axes=ffn,
        embed_axes=embed,
        batch_shards=math.prod(mesh_shape[a] for a in batch),
        ep_size=math.prod(mesh_shape[a] for a in experts),
    )


def check_node_alignment(cfg: ModelConfig, ep_size: int) -> int:
    """Devices per node (expert group) on the expert axis; raises if groups straddle devices.

    Node-limited routing bounds a token's destinations only when each of the `n_group` groups
    covers whole devices (P % G == 0) or each device holds whole groups (G % P == 0).
    """
    G = cfg.n_group
    if ep_size % G and G % ep_size:
        raise ValueError(
            f"ModelConfig.n_group={G} and expert-parallel size {ep_size}: one must divide the "
            "other so that every expert group (node) covers whole devices"
        )
    return max(1, ep_size // G)


def nodes_per_token(experts: jax.Array, cfg: ModelConfig, ep_size: int) -> jax.Array:
    """Distinct nodes each token is sent to: experts [M, K] -> [M] int32.

    A node is the set of devices holding one expert group (one device when a device holds
    several groups); with group-limited routing the count is at most `topk_group`.
    """
    per_node = check_node_alignment(cfg, ep_size)
    device = experts // (cfg.n_routed_experts // ep_size)  # [M, K]
    n_nodes = ep_size // per_node
    hit = jax.nn.one_hot(device // per_node, n_nodes, dtype=jnp.int32).max(axis=1)  # [M, nodes]
    return hit.sum(-1)


def global_expert_load(expert_counts: jax.Array, parallel: ParallelConfig) -> jax.Array:
    """[..., B, E] per-sequence counts -> [..., E] summed over the global batch, replicated.

    The counts leave the EP shard_map split over the batch axes, so this sum is an all-reduce
    over the whole mesh; every replica then applies the same `router.bias_update`.
    """
    load = expert_counts.sum(axis=-2)
    replicated = parallel.replicated()
    return load if replicated is None else jax.lax.with_sharding_constraint(load, replicated)


# ---- the shard_map body ----------------------------------------------------------------------
def _local_experts(
    xs, local_ids, w_gate, w_up, w_down, *, axes=(), fp8: bool = False, per_row: int = 1
):
    """SwiGLU of rows xs [N, D] by their local experts (ids in [0, E_l]; E_l = empty) -> [N, D].

    `per_row`: local_ids [N per_row] holds that many experts for each row of xs (one received
    token's experts on this device), and the result is [N per_row, D].

    `axes`: the shard_map's manual axes. The grouped matmul (a custom VJP) must return
    cotangents typed like its inputs, but a cotangent can vary over more axes than its primal (a
    weight replicated over `data` gets a gradient per data shard, a token row one per tensor
    rank). Inputs cast to vary over every such axis (`EPLayout.varying_axes`, `vary_over`) avoid
    the mismatch; the cast's transpose is the psum that sums such a gradient over the shards.
    """
    E_l = w_gate.shape[0]
    order = jnp.argsort(local_ids, stable=True)
    sizes = jnp.bincount(local_ids, length=E_l + 1)[:E_l].astype(jnp.int32)  # empties last
    xs_sorted, w_gate, w_up, w_down = vary_over(axes, xs[order // per_row], w_gate, w_up, w_down)
    ys = swiglu_grouped(xs_sorted, w_gate, w_up, w_down, sizes, fp8)  # [N, D]; empties 0
    return jnp.zeros_like(ys).at[order].set(ys)


def _all_to_all(x, axes):
    if not axes:
        return x
    return jax.lax.all_to_all(x, _axis_arg(axes), 0, 0, tiled=True)  # [P, ...] blocks swap


def _device_level_keep(
    r: Routing, klass, layout: EPLayout, sizes: CapacitySizes, *, hard: bool = False
):
    """V2's device-level dropping (Sec. 2.2.3): which assignments their receivers keep.

    1. each source ranks its assignments to each device by `_priority` and sends its best
       S = sizes.send_rows per device, [P, S] f32 (all_to_all): no device keeps more than S of
       one source's, since it keeps at most max(C, protected arrivals) <= S or all R <= S;
    2. each device keeps its budget C of best arrivals across all sources and every protected
       one (`device_keep`; with `hard`, protected ones first but never past C); per source
       they are a prefix of its ranked rows, so the count [P] int32 goes back (all_to_all),
       and each source keeps that many of its best.
    Padding ranks last (-inf), is never kept and takes no room.

    Returns:
      `capacity_layout`'s (order, sorted_dest, slot) of a [P, S] send buffer, and keep_sorted
      [M*K] whether each sorted assignment is kept (then its slot is < S).
    """
    n_dev, axes = layout.ep_size, layout.expert_axes
    E_l, S = r.scores.shape[-1] // n_dev, sizes.send_rows
    prio = priority(r, klass)  # [M, K]
    order, sorted_dest, slot, _ = capacity_layout(r.experts // E_l, prio, n_dev, S)
    send_p = jnp.full((n_dev, S), -jnp.inf, prio.dtype)
    send_p = send_p.at[sorted_dest, slot].set(prio.reshape(-1)[order], mode="drop")  # [P, S]
    recv_p = _all_to_all(send_p, axes)  # [P, S]: block q came from source q
    n_keep = device_keep(recv_p, sizes.budget, hard=hard).sum(-1, dtype=jnp.int32)  # [P]
    n_keep = _all_to_all(n_keep, axes)  # [P]: how many of my best device p keeps
    return order, sorted_dest, slot, slot < n_keep[sorted_dest]  # slot S: never kept


def _capacity_exchange(xc, r: Routing, klass, ws, layout: EPLayout, cfg, sizes: CapacitySizes):
    """Device-level dropping (V2 Sec. 2.2.3) over fixed all-to-alls -> ([M, D], dropped count).

    klass [M]: 0 padding (never sent), 1 a token, 2 a token of a never-dropped sequence.
    `_device_level_keep` decides which assignments their devices keep (priorities out, keep
    counts back); the kept rows travel in [P, S, D] blocks (S = sizes.send_rows: kept rows from
    one source never exceed it), are compacted to the device's recv_rows, run through the local
    experts and return (two all_to_alls).
    """
    M, K = r.experts.shape
    D, E_l, n_dev, axes = xc.shape[-1], ws[0].shape[0], layout.ep_size, layout.expert_axes
    S = sizes.send_rows
    order, sorted_dest, slot, keep_sorted = _device_level_keep(r, klass, layout, sizes)
    slot = jnp.where(keep_sorted, slot, S)  # out of range: the scatters drop it
    sorted_e = r.experts.reshape(-1)[order]
    send = jnp.zeros((n_dev, S, D), xc.dtype)
    send = send.at[sorted_dest, slot].set(xc[order // K], mode="drop")  # [P, S, D]
    ids = jnp.full((n_dev, S), E_l, jnp.int32)
    ids = ids.at[sorted_dest, slot].set(sorted_e % E_l, mode="drop")  # [P, S]
    recv = _all_to_all(send, axes).reshape(n_dev * S, D)
    recv_ids = _all_to_all(ids, axes).reshape(-1)  # [P S]
    # at most recv_rows of the P S rows are filled: compute on those only
    rows = jnp.argsort(recv_ids == E_l, stable=True)[: sizes.recv_rows]  # filled rows first
    y = _local_experts(recv[rows], recv_ids[rows], *ws, axes=layout.varying_axes, fp8=cfg.fp8)
    y = jnp.zeros((n_dev * S, D), y.dtype).at[rows].set(y)
    back = _all_to_all(y.reshape(n_dev, S, D), axes)  # block p was computed on p
    ys = back.at[sorted_dest, slot].get(mode="fill", fill_value=0)  # [M*K, D], sorted order
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(M, K, D)
    real = jnp.repeat(klass > 0, K)[order]
    dropped = (real & ~keep_sorted).sum()
    return jnp.einsum("mkd,mk->md", y, r.weights.astype(y.dtype)), dropped


def token_device_pairs(r: Routing, E_l: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A token's assignments grouped by the device that holds their experts (E_l per device).

    V3 (Sec. 3.2.2) sends a token to each node it is routed to once, however many of its
    experts are there; this is the same deduplication per device of the EP group.

    Returns:
      first [M, K] bool: assignment k is its token's first to its device: the (token, device)
        pair's row;
      ids [M, K, J] int32, J = min(K, E_l): on a pair's row, the local experts of all the
        token's assignments to that device in the order of k (E_l: no more);
      weights [M, K, J]: their gating weights (0 for none).
    """
    M, K = r.experts.shape
    J = min(K, E_l)
    dest = r.experts // E_l  # [M, K]
    same = dest[:, :, None] == dest[:, None, :]  # [M, K, K']
    earlier = same & jnp.tri(K, k=-1, dtype=bool)  # ... and k' < k
    first = ~earlier.any(-1)  # [M, K]
    rank = earlier.sum(-1)  # [M, K]: place of k among its token's assignments to its device
    take = same[..., None] & (rank[:, None, :, None] == jnp.arange(J))  # [M, K, K', J]
    local = (r.experts % E_l)[:, None, :, None]  # [M, 1, K', 1]
    ids = jnp.where(take.any(2), jnp.where(take, local, 0).sum(2), E_l).astype(jnp.int32)
    weights = jnp.einsum("mkqj,mq->mkj", take.astype(r.weights.dtype), r.weights)
    return first, ids, weights


def mean_device_pairs(cfg: ModelConfig, ep_size: int, tokens: int = 4096, seed: int = 0) -> float:
    """Mean (token, device) pairs per token, the rows `_ragged_dropless_exchange` sends each way,
    for cfg's router (group-limited top-K) over random logits, an untrained router's, with
    E / ep_size experts per device (bench/ep_dispatch_rows.py, the planner's note)."""
    logits = jax.random.normal(jax.random.key(seed), (tokens, cfg.n_routed_experts))
    first, _, _ = token_device_pairs(route(logits, None, cfg), cfg.n_routed_experts // ep_size)
    return float(first.sum()) / tokens


def _ragged_dropless_exchange(xc, r: Routing, ws, layout: EPLayout, cfg: ModelConfig, a2a):
    """Dispatch/combine with ragged all-to-alls, one row per (token, device) pair; returns
    ([M, D], dropped count 0).

    Each source sends a token's row once to every device holding some of its experts, with
    those experts' local ids and gating weights ([J] int32 and f32 beside the row); the device
    runs them and returns one row, the weighted sum of their outputs, which the source adds up.
    The wire carries the distinct pairs, not the M K assignments, each way (where a device holds
    whole routing groups a token reaches at most topk_group devices: V3 on EP8 sends ~4 rows of
    8; bench/ep_dispatch_rows.py); the receive buffer holds P M rows (each source's tokens at
    most once) instead of P M min(K, E_l). Padding is sent too: this path drops nothing.
    """
    M, K = r.experts.shape
    D, E_l, n_dev, manual = xc.shape[-1], ws[0].shape[0], layout.ep_size, layout.varying_axes
    J, N = min(K, E_l), n_dev * M
    first, ids, weights = token_device_pairs(r, E_l)
    dest = jnp.where(first, r.experts // E_l, n_dev).reshape(-1)  # [M*K]: not a pair -> last
    order = jnp.argsort(dest, stable=True)  # pairs by destination device
    counts = jnp.bincount(dest, length=n_dev + 1)[:n_dev].astype(jnp.int32)  # [P] pairs
    axis = _axis_arg(layout.expert_axes)
    p = device_plan(jax.lax.all_gather(counts, axis), jax.lax.axis_index(axis))
    xs = xc[order // K]  # [M*K, D]
    send_ids = ids.reshape(M * K, J)[order]
    send_w = weights.reshape(M * K, J)[order].astype(jnp.float32)
    # Receive buffers typed per device as the data is (see `_ragged_exchange`).
    buf, ids_buf, w_buf, back_buf = vary_over(
        manual,
        jnp.zeros((N, D), xs.dtype),
        jnp.full((N, J), E_l, jnp.int32),  # rows nobody sent: no expert
        jnp.zeros((N, J), jnp.float32),
        jnp.zeros((M * K, D), xs.dtype),
    )
    plan = (p.input_offsets, p.send_sizes, p.output_offsets, p.recv_sizes)
    recv = a2a(xs, buf, *plan, axis_name=axis)  # [N, D]
    recv_ids = a2a(send_ids, ids_buf, *plan, axis_name=axis)  # [N, J]
    recv_w = a2a(send_w, w_buf, *plan, axis_name=axis)  # [N, J]
    y = _local_experts(recv, recv_ids.reshape(-1), *ws, axes=manual, fp8=cfg.fp8, per_row=J)
    y = jnp.einsum(
        "njd,nj->nd", y.reshape(N, J, D), recv_w, preferred_element_type=jnp.float32
    ).astype(xs.dtype)  # one row back per pair
    back = a2a(
        y, back_buf, p.recv_offsets, p.recv_sizes, p.return_offsets, p.send_sizes, axis_name=axis
    )  # [M*K, D] destination-sorted; rows that are no pair stay 0
    out = jnp.zeros((M, D), jnp.float32).at[order // K].add(back.astype(jnp.float32))
    return out.astype(xs.dtype), jnp.zeros((), jnp.int32)


def _ragged_exchange(
    xc, r: Routing, klass, ws, layout: EPLayout, cfg: ModelConfig, sizes: CapacitySizes, a2a
):
    """Dispatch/combine with ragged all-to-alls when a device can overflow (budget C < P R);
    returns ([M, D], dropped count).

    `_device_level_keep` decides first which assignments the receivers keep (V2 Sec. 2.2.3),
    each source sends only those, one row per assignment, and the plan is built from the
    post-drop counts, so every receiver's arrivals fit its sizes.recv_rows. (With a worst-case
    buffer nothing can drop: `_ragged_dropless_exchange`.)
    """
    M, K = r.experts.shape
    D, E_l, manual = xc.shape[-1], ws[0].shape[0], layout.varying_axes
    E = layout.ep_size * E_l
    order, _, _, keep_sorted = _device_level_keep(r, klass, layout, sizes, hard=True)
    keep = jnp.zeros((M * K,), bool).at[order].set(keep_sorted)  # [M*K]
    dropped = (jnp.repeat(klass > 0, K) & ~keep).sum()
    flat_e = jnp.where(keep, r.experts.reshape(-1), E)  # dropped rows sort last, never sent
    order = jnp.argsort(flat_e, stable=True)  # by expert, hence by destination device
    xs = xc[order // K]  # [M*K, D]
    counts = jnp.bincount(flat_e, length=E + 1)[:E].astype(jnp.int32)  # [E] rows sent
    axis = _axis_arg(layout.expert_axes)
    buffer_rows = sizes.recv_rows
    p = ragged_plan(jax.lax.all_gather(counts, axis), jax.lax.axis_index(axis), buffer_rows)
    # The collective types its result like its `output` buffer: a buffer that varies over every
    # axis the data does keeps the received rows typed per device (else the autodiff casts of
    # `vary_over` would psum their cotangents across devices).
    buf, back_buf = vary_over(
        manual, jnp.zeros((buffer_rows, D), xs.dtype), jnp.zeros((M * K, D), xs.dtype)
    )
    recv = a2a(
        xs, buf, p.input_offsets, p.send_sizes, p.output_offsets, p.recv_sizes, axis_name=axis
    )
    y = _local_experts(recv, p.recv_expert, *ws, axes=manual, fp8=cfg.fp8)  # [N, D]
    back = a2a(
        y, back_buf, p.recv_offsets, p.recv_sizes, p.return_offsets, p.send_sizes, axis_name=axis
    )  # [M*K, D] expert-sorted; dropped rows stay 0
    y = jnp.zeros_like(back).at[order].set(back).reshape(M, K, D)
    return jnp.einsum("mkd,mk->md", y, r.weights.astype(y.dtype)), dropped


def _local_dropless(xc, r: Routing, ws, layout: EPLayout, cfg: ModelConfig):
    """One device per EP group (the experts replicated): nothing to exchange.

    The device's tokens run the single-device dropless plan, `routed_dropless`: on CPU the
    block-sparse GEMM (the sort + ragged_dot of `_local_experts` costs about E times the routed
    FLOPs there: a 2-device data-parallel v3-small step took 5x the time of one device), under
    FP8 the grouped FP8 kernels. Either way it takes the FP32 master weights and returns FP32
    weight gradients.
    """
    xc, *ws = vary_over(layout.varying_axes, xc, *ws)
    return routed_dropless(xc, r, *ws, fp8=cfg.fp8), jnp.zeros((), jnp.int32)


def _gather(w, axes, dim, dtype=None):
    """FSDP: all-gather a weight's D over `axes` (its transpose is a reduce-scatter).

    `dtype`: the bytes that cross the wire when lower than w's (the compute dtype under FP32
    master weights); the gathered weight keeps w's dtype, see `_gather_as`.
    """
    if not axes:
        return w
    if dtype is None or jnp.dtype(dtype) == w.dtype:
        return jax.lax.all_gather(w, _axis_arg(axes), axis=dim, tiled=True)
    return _gather_as(w, axes, dim, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_as(w, axes, dim, dtype):
    """All-gather of an FP32 master shard sent as `dtype` bytes; returns FP32 holding those values.

    The expert products cast their weights to the compute dtype anyway, so rounding before the
    gather changes no product, and halves the FSDP traffic under BF16. Autodiff of a BF16 gather
    would hand back a BF16 weight gradient; this transpose reduce-scatters the FP32 cotangent
    instead, so expert-parallel weight gradients accumulate and stay FP32 (V3 Sec. 3.3.3: "weight
    gradients ... in FP32" with FP32 master weights).
    """
    gathered = jax.lax.all_gather(w.astype(dtype), _axis_arg(axes), axis=dim, tiled=True)
    return gathered.astype(w.dtype)


def _gather_as_fwd(w, axes, dim, dtype):
    return _gather_as(w, axes, dim, dtype), None


def _gather_as_bwd(axes, dim, dtype, _, g):
    return (jax.lax.psum_scatter(g, _axis_arg(axes), scatter_dimension=dim, tiled=True),)


_gather_as.defvjp(_gather_as_fwd, _gather_as_bwd)


def _ep_body(
    router_w,
    router_rest,
    x,
    klass,
    w_gate,
    w_up,
    w_down,
    *,
    router_def,
    cfg,
    layout,
    exchange,
    sizes,
):
    """One device's routed experts: x [B_l, T, D] -> (routed, routing, dropped count)."""
    B_l, T, D = x.shape
    xf = x.reshape(B_l * T, D)  # [M_l, D]
    D_ax = layout.embed_axes
    router_w = jax.tree.map(lambda w: _gather(w, D_ax, 0), router_w)  # [D, E]
    r = nnx.merge(router_def, router_w, router_rest)(xf)  # the router runs on local tokens, in fp32
    xc = xf.astype(cfg.compute_dtype)
    dt = cfg.compute_dtype  # the wire dtype; the weights stay FP32 masters (see `_gather_as`)
    ws = (_gather(w_gate, D_ax, 1, dt), _gather(w_up, D_ax, 1, dt), _gather(w_down, D_ax, 2, dt))
    if exchange == "capacity":
        routed, dropped = _capacity_exchange(xc, r, klass.reshape(-1), ws, layout, cfg, sizes)
    elif layout.ep_size == 1:
        routed, dropped = _local_dropless(xc, r, ws, layout, cfg)
    else:
        a2a = ragged_all_to_all_emulated if exchange == "ragged_emulated" else None
        a2a = a2a or jax.lax.ragged_all_to_all
        if sizes.never_overflows(layout.ep_size):
            routed, dropped = _ragged_dropless_exchange(xc, r, ws, layout, cfg, a2a)
        else:
            k = klass.reshape(-1)
            routed, dropped = _ragged_exchange(xc, r, k, ws, layout, cfg, sizes, a2a)
    if layout.ffn_axes:  # each rank holds a slice of F: its outputs are partial sums
        routed = jax.lax.psum(routed, _axis_arg(layout.ffn_axes))
    if layout.batch_axes:
        dropped = jax.lax.psum(dropped, _axis_arg(layout.batch_axes))
    local = Routing(*(a.reshape(B_l, T, -1) for a in (r.weights, r.experts, r.scores)))
    return routed.reshape(B_l, T, D), local, dropped


def expert_parallel_routed(
    router: nnx.Module,
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    cfg: ModelConfig,
    *,
    parallel: ParallelConfig,
    buffer_rows: int | None = None,
    token_mask: jax.Array | None = None,
) -> tuple[jax.Array, Routing, jax.Array]:
    """Routes and runs the routed experts under `jax.shard_map` on `parallel.mesh`.

    Communication plan (scaling-book notation; X = the batch axes, E over `expert` with P
    devices, F over the `expert_mlp` axes Y when set, M_l = B_l T local tokens):

        x[B_X, T, D]; W_g[D_Z, E], W[E_P, D_Z, F_Y]   Z = the `embed` (FSDP) axes
        W_g, W -> all_gather(Z) -> [D, ...]   FSDP; the transpose is a reduce-scatter over Z
        s[B_X T, E] = x W_g; top-K            local routing (group-limited, node-limited)
        drop      (capacity; ragged when its buffer C < P R) V2 Sec. 2.2.3 device-level rule:
                  priorities [P, S] f32 -> all_to_all -> keep counts [P] int32 -> all_to_all
                  (S = CapacitySizes.send_rows, R = pair_rows)
        dispatch  a[M_l K, D] -> all_to_all(expert) -> a[P x rows_from_q, D]
                  capacity: [P, S, D] + ids [P, S]
                  ragged, C >= P R (dropless): one row per (token, device) pair, at most
                  M_l min(K, P), with its J = min(K, E/P) local expert ids [J] int32 and
                  gating weights [J] f32, planned from an all_gather of the [P] int32 pair
                  counts (`_ragged_dropless_exchange`)
                  ragged, C < P R: the kept assignments, planned from an all_gather of the
                  [E] int32 per-expert counts of the rows sent (`_ragged_exchange`)
        experts   h = SwiGLU(a; W_gate/up[E_P, D, F_Y], W_down[E_P, F_Y, D])  grouped matmul
        combine   y[P x rows, D] -> all_to_all(expert) -> y[rows sent, D]
                  (dropless ragged: the device's weighted sum over the pair's experts)
        out[B_X T, D] = sum_k g_k y_k; psum_Y(out) when F is split over Y
        dropped: psum_X of the local count

    Bytes per device per layer, forward (the backward repeats the float exchanges, not the
    dropping decision, and a full remat recomputes the forward's): capacity 2 P S D b + 4 P S
    (ids) + 4 P S + 4 P (priorities and keep counts); ragged dropless 2 n D b + 8 n J for its n
    (token, device) pairs (n <= M_l min(K, P); V3's node limit keeps a token's devices few);
    ragged with a buffer bound at most 2 M_l K D b plus 4 P S + 4 P; each ragged one plus an
    all-gather of its int32 counts (the real collective sends (P-1)/P of it off-device).

    Args:
      router: the MoE's Router module (split and merged inside the shard_map).
      x: [B, T, D] tokens, split over the batch axes.
      w_gate, w_up: [E, D, F]; w_down: [E, F, D]: the master weights (FP32 under BF16 compute:
        they cross the FSDP gather as compute-dtype bytes, the products run in the compute
        dtype, and their gradients come back in FP32; V3 Sec. 3.3.3).
      cfg: model config (sizes, capacity_factor, compute dtype).
      parallel: the mesh, rules and exchange ('ragged' | 'ragged_emulated' | 'capacity'; its
        buffer_factor sizes the ragged receive buffer).
      buffer_rows: the ragged path's budget C (default `ragged_buffer_rows` with
        parallel.buffer_factor). At the worst case P R nothing can drop and the exchange sends
        (token, device) pairs into P M_l receive rows; below it, C is the receive rows and
        overflow follows V2's device-level rule. The buffer is then a hard bound: a protected
        sequence's rows rank first but are dropped (and counted) when they alone overflow it;
        the capacity exchange instead grows its `CapacitySizes.recv_rows` to keep every
        protected row.
      token_mask: [B, T] bool, False on padding: the dropping exchanges never send padding, so
        it takes no device budget (the dropless ragged one sends it); None = no padding.
    Returns:
      (routed [B, T, D], Routing with weights/experts [B*T, K] and scores [B*T, E],
       dropped fraction [] of the real (token, expert) assignments).
    """
    exchange = parallel.exchange
    if exchange not in ("ragged", "ragged_emulated", "capacity"):
        raise ValueError(
            f"ParallelConfig.exchange={exchange!r}: expert parallelism needs ragged, "
            "ragged_emulated or capacity"
        )
    mesh_shape = parallel.mesh_shape
    layout = ep_layout(mesh_shape, parallel.rules_dict)
    B, T, D = x.shape
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    if B % layout.batch_shards:
        raise ValueError(
            f"batch size {B} is not divisible by the batch axes {layout.batch_axes} "
            f"(total size {layout.batch_shards})"
        )
    if E % layout.ep_size:
        raise ValueError(
            f"ModelConfig.n_routed_experts={E} is not divisible by the expert axes "
            f"{layout.expert_axes} (total size {layout.ep_size})"
        )
    tokens = B // layout.batch_shards * T
    mask = jnp.ones((B, T), bool) if token_mask is None else token_mask.astype(bool)
    protect = protected_sequences(B, cfg.never_drop_share)  # [B] (V2 Sec. 2.3)
    klass = jnp.where(mask, jnp.where(jnp.asarray(protect)[:, None], 2, 1), 0).astype(jnp.int32)
    if exchange == "capacity":
        B_l = B // layout.batch_shards
        most = max(int(protect[i : i + B_l].sum()) for i in range(0, B, B_l)) * T
        sizes = capacity_sizes(tokens, cfg, layout.ep_size, most)
    else:  # the ragged buffer is the budget C of the same device-level rule
        factor = parallel.buffer_factor
        budget = buffer_rows or ragged_buffer_rows(tokens, cfg, layout.ep_size, factor)
        # A hard bound: protected rows come first, but the buffer never grows for them (it
        # would reach the worst case P R whenever one source holds a protected sequence).
        sizes = capacity_sizes(tokens, cfg, layout.ep_size, budget=budget)
    router_def, router_w, router_rest = nnx.split(router, nnx.Param, ...)
    X = layout.batch_axes or None
    EX = layout.expert_axes or None
    F = layout.ffn_axes or None
    D_ax = layout.embed_axes or None
    router_spec = jax.tree.map(lambda _: P(D_ax, None), router_w)  # router e_i: [D, E]
    body = functools.partial(
        _ep_body, router_def=router_def, cfg=cfg, layout=layout, exchange=exchange, sizes=sizes
    )
    out_routing = Routing(P(X), P(X), P(X))
    routed, r, dropped = jax.shard_map(
        body,
        mesh=parallel.mesh,
        in_specs=(router_spec, P(), P(X), P(X), P(EX, D_ax, F), P(EX, D_ax, F), P(EX, F, D_ax)),
        out_specs=(P(X), out_routing, P()),
    )(router_w, router_rest, x, klass, w_gate, w_up, w_down)
    flat = Routing(*(a.reshape(B * T, -1) for a in r))  # [M, K], [M, K], [M, E]
    real = jnp.maximum(mask.sum() * K, 1).astype(jnp.float32)  # padding is never routed
    return routed, flat, dropped.astype(jnp.float32) / real
