"""Pipeline executor: runs a 1F1B / ZB1P / DualPipe schedule as a `lax.scan` over lockstep steps.

The schedule (sharding/schedules.py) gives each rank an ordered op list. `lockstep_tables` turns
it into a global clock: at step t, rank r runs at most one forward (F slot) and one backward chunk
(B, W or BW slot), an overlapped F&B pair sharing a step. An op runs at the first step at which
its inputs have arrived (messages sent at step t are usable from step t + 1), never out of its
rank's order; the tables are plain numpy arrays, baked into the program as constants.

`pipeline_grads` executes the tables inside `jax.shard_map` over the `stage` mesh axis. Per step
each rank, with `lax.cond`/`lax.switch` on its own row of the tables:
  F:  (y, loss, aux) = stage_fn(params[d], shared, x[d, m], inputs[m], first, last)
  B:  dx = vjp of stage_fn w.r.t. x at the saved input, cotangent (dy[d, m], dloss)
  W:  dW = vjp of stage_fn w.r.t. (params[d], shared), same cotangent, accumulated
  BW: both in one vjp.
then activations move one rank along their direction and input-gradients one rank back with four
`ppermute`s (two shifts per message kind, one for each direction). B and W re-run the stage
forward inside `jax.vjp` (stage-granular rematerialisation) instead of keeping residuals. The
backward slot's switch holds only the kinds the schedule uses (1F1B: BW; ZB1P: B, W): each kind
is one more copy of the stage's forward and backward for XLA to compile.

Communication plan (scaling-book notation, X = the stage axis of size PP, per step):
  act[b, T, D] --ppermute(r -> r+1)--> and --ppermute(r -> r-1)--> (one per direction)
  grad[b, T, D] --ppermute(r -> r-1)--> and --ppermute(r -> r+1)-->
  once: params[X] --ppermute(r -> PP-1-r)--> mirror copy (DualPipe: rank r holds stages r and
  PP-1-r); at the end dW_mirror --ppermute(r -> PP-1-r)--> and is summed into the owner's dW;
  shared dW --psum(X)-->; loss --psum(X)-->.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from deepseek_jax.sharding.schedules import Op, OpKind, Schedule

_BKIND = {None: 0, OpKind.B: 1, OpKind.W: 2, OpKind.BW: 3}


@dataclasses.dataclass(frozen=True)
class LockstepTables:
    """Per-step, per-rank op tables ([steps, PP] int32 arrays; -1 / 0 where idle)."""

    f_on: np.ndarray  # 1 if the rank runs a forward at this step
    f_dir: np.ndarray
    f_mb: np.ndarray  # micro-batch index within its direction
    f_stage: np.ndarray
    b_kind: np.ndarray  # 0 idle, 1 B, 2 W, 3 BW
    b_dir: np.ndarray
    b_mb: np.ndarray
    b_stage: np.ndarray
    # What arrives at the end of the step: from the left neighbour (r-1) and the right (r+1).
    act_from_left: np.ndarray  # micro-batch of a direction-0 activation, or -1
    act_from_right: np.ndarray  # micro-batch of a direction-1 activation, or -1
    grad_from_left: np.ndarray  # micro-batch of a direction-1 input-gradient, or -1
    grad_from_right: np.ndarray  # micro-batch of a direction-0 input-gradient, or -1

    @property
    def num_steps(self) -> int:
        return self.f_on.shape[0]


def lockstep_tables(schedule: Schedule) -> LockstepTables:
    """Places every op of `schedule` on a global step clock (see module docstring)."""
    PP = schedule.num_ranks
    done: dict[tuple, int] = {}  # (kind, dir, mb, stage) -> step it ran
    ptr = [0] * PP
    rows: list[list[tuple[Op | None, Op | None]]] = []

    def ready(op: Op, t: int) -> bool:
        key = (op.direction, op.microbatch)
        if op.kind == OpKind.F:
            return op.stage == 0 or done.get(("F", *key, op.stage - 1), t) < t
        if op.kind == OpKind.W:
            return done.get(("B", *key, op.stage), t) < t
        own_f = done.get(("F", *key, op.stage), t) < t
        last = op.stage == schedule.num_stages - 1
        return own_f and (last or done.get(("B", *key, op.stage + 1), t) < t)

    total = sum(len(r) for r in schedule.ranks)
    t = 0
    while sum(ptr) < total:
        if t > 4 * total + 8:
            raise RuntimeError(f"{schedule.name}: lockstep placement deadlocked at step {t}")
        row = []
        for r, ops in enumerate(schedule.ranks):
            f_op = b_op = None
            if ptr[r] < len(ops) and ops[ptr[r]].kind == OpKind.F and ready(ops[ptr[r]], t):
                f_op = ops[ptr[r]]
                ptr[r] += 1
                paired = f_op.overlap_with_next
                if paired and ptr[r] < len(ops) and ready(ops[ptr[r]], t):
                    b_op = ops[ptr[r]]
                    ptr[r] += 1
            elif ptr[r] < len(ops) and ops[ptr[r]].kind != OpKind.F and ready(ops[ptr[r]], t):
                b_op = ops[ptr[r]]
                ptr[r] += 1
            row.append((f_op, b_op))
        for f_op, b_op in row:
            for op in (f_op, b_op):
                if op is not None:
                    kind = "B" if op.kind in (OpKind.B, OpKind.BW) else str(op.kind)
                    done[(kind, op.direction, op.microbatch, op.stage)] = t
        rows.append(row)
        t += 1
    return _tables_from_rows(rows, schedule)


def _tables_from_rows(rows, schedule: Schedule) -> LockstepTables:
    S, PP = len(rows), schedule.num_ranks
    z = lambda fill=0: np.full((S, PP), fill, np.int32)  # noqa: E731
    f_on, f_dir, f_mb, f_stage = z(), z(), z(), z()
    b_kind, b_dir, b_mb, b_stage = z(), z(), z(), z()
    act_l, act_r, grad_l, grad_r = z(-1), z(-1), z(-1), z(-1)
    last = schedule.num_stages - 1
    for t, row in enumerate(rows):
        for r, (f_op, b_op) in enumerate(row):
            if f_op is not None:
                f_on[t, r], f_dir[t, r], f_mb[t, r], f_stage[t, r] = (
                    1,
                    f_op.direction,
                    f_op.microbatch,
                    f_op.stage,
                )
                if f_op.stage != last:  # activation goes one rank along the direction
                    dst = r + 1 if f_op.direction == 0 else r - 1
                    (act_l if f_op.direction == 0 else act_r)[t, dst] = f_op.microbatch
            if b_op is not None:
                b_kind[t, r], b_dir[t, r], b_mb[t, r], b_stage[t, r] = (
                    _BKIND[b_op.kind],
                    b_op.direction,
                    b_op.microbatch,
                    b_op.stage,
                )
                if b_op.kind in (OpKind.B, OpKind.BW) and b_op.stage != 0:
                    dst = r - 1 if b_op.direction == 0 else r + 1
                    (grad_r if b_op.direction == 0 else grad_l)[t, dst] = b_op.microbatch
    return LockstepTables(
        f_on, f_dir, f_mb, f_stage, b_kind, b_dir, b_mb, b_stage, act_l, act_r, grad_l, grad_r
    )


StageFn = Callable[..., tuple[jax.Array, jax.Array, Any]]


def _split_aux(out):
    y, loss, aux = out
    return (y, loss), aux


def _shift(x, axis: str, PP: int, offset: int):
    perm = [(r, r + offset) for r in range(PP) if 0 <= r + offset < PP]
    return jax.lax.ppermute(x, axis, perm)


def pipeline_grads(
    stage_fn: StageFn,
    stage_params: Any,
    shared_params: Any,
    inputs: Any,
    act_shape: jax.ShapeDtypeStruct,
    schedule: Schedule,
    mesh: Mesh,
    axis: str = "stage",
):
    """Loss and gradients of a pipelined model, executed with `schedule`.

    Args:
      stage_fn: `(params, shared, x, inputs_m, is_first, is_last) -> (y, loss, aux)` for one
        stage and one micro-batch: x/y are activations of `act_shape`; `loss` is the stage's
        scalar contribution (the step's loss is the sum over stages, mean over micro-batches);
        `aux` a pytree of statistics (same structure on every stage) summed over micro-batches;
        is_first/is_last are traced booleans.
      stage_params: pytree, every leaf with a leading [PP] stage axis (stage s on rank s).
      shared_params: pytree used by several stages (embedding, head): replicated over `axis`.
      inputs: pytree of per-micro-batch inputs, leading axis [num_microbatches].
      act_shape: shape/dtype of one micro-batch's stage activation.
      schedule: from deepseek_jax.sharding.schedules; its num_ranks must equal the `axis` size.
      mesh: mesh with the `axis` axis.
    Returns:
      (mean loss over micro-batches, stage-param grads [PP, ...], shared-param grads,
       aux summed over micro-batches [PP, ...] per stage).
    """
    PP = schedule.num_ranks
    if mesh.shape[axis] != PP:
        raise ValueError(f"schedule has {PP} ranks but mesh axis {axis!r} has {mesh.shape[axis]}")
    n_mb = jax.tree.leaves(inputs)[0].shape[0]
    if n_mb != schedule.num_microbatches:
        raise ValueError(
            f"inputs hold {n_mb} micro-batches, schedule expects {schedule.num_microbatches}"
        )
    tab = lockstep_tables(schedule)
    per_dir = schedule.microbatches_per_direction
    b_kinds = np.unique(tab.b_kind).tolist()  # the backward kinds this schedule uses
    tables = {k: jnp.asarray(v) for k, v in dataclasses.asdict(tab).items() if k != "b_kind"}
    # The program's per-step table: which of the compiled backward branches (one per used kind).
    tables["b_branch"] = jnp.asarray(np.searchsorted(b_kinds, tab.b_kind), jnp.int32)

    def body(stage_p, shared, inp):
        r = jax.lax.axis_index(axis)
        own = jax.tree.map(lambda a: a[0], stage_p)  # this rank's stage (direction 0)
        mirror = jax.tree.map(
            lambda a: jax.lax.ppermute(a, axis, [(i, PP - 1 - i) for i in range(PP)]), own
        )  # stage PP-1-r (direction 1)
        params2 = jax.tree.map(lambda a, b: jnp.stack([a, b]), own, mirror)
        zeros_act = jnp.zeros((2, per_dir) + act_shape.shape, act_shape.dtype)

        def fn(params, shared, x, d, m, stage):
            g = m + d * per_dir
            inp_m = jax.tree.map(lambda a: a[g], inp)
            return stage_fn(params, shared, x, inp_m, stage == 0, stage == PP - 1)

        aux_shape = jax.eval_shape(lambda: fn(own, shared, zeros_act[0, 0], 0, 0, 0)[2])
        zeros_aux = jax.tree.map(lambda a: jnp.zeros((2,) + a.shape, a.dtype), aux_shape)

        def pick(d):
            return jax.tree.map(lambda a: a[d], params2)

        def step(carry, t):
            acts, grads_in, g_params, g_shared, loss, aux = carry
            row = {k: v[t, r] for k, v in tables.items()}

            # ---- F slot ----
            def do_f(_):
                d, m, s = row["f_dir"], row["f_mb"], row["f_stage"]
                y, l, a = fn(pick(d), shared, acts[d, m], d, m, s)
                a = jax.tree.map(lambda z, v: z.at[d].set(v), zeros_aux, a)
                return y.astype(act_shape.dtype), l.astype(jnp.float32), a

            def no_f(_):
                y0 = jnp.zeros(act_shape.shape, act_shape.dtype)
                return y0, jnp.zeros((), jnp.float32), zeros_aux

            y, l, a = jax.lax.cond(row["f_on"] == 1, do_f, no_f, None)
            loss = loss + l / n_mb
            aux = jax.tree.map(jnp.add, aux, a)

            # ---- B / W / BW slot ----
            d, m, s = row["b_dir"], row["b_mb"], row["b_stage"]
            is_last = s == PP - 1
            dy = jnp.where(is_last, jnp.zeros(act_shape.shape, act_shape.dtype), grads_in[d, m])
            dl = jnp.asarray(1.0 / n_mb, jnp.float32)
            zero_dx = jnp.zeros(act_shape.shape, act_shape.dtype)
            zero_g = (jax.tree.map(jnp.zeros_like, own), jax.tree.map(jnp.zeros_like, shared))

            def vjp_all(_):
                f = lambda p, sh, x: _split_aux(fn(p, sh, x, d, m, s))  # noqa: E731
                _, pull, _ = jax.vjp(f, pick(d), shared, acts[d, m], has_aux=True)
                return pull((dy, dl))

            def b_none(_):
                return zero_dx, zero_g

            def b_input(_):
                f = lambda x: _split_aux(fn(pick(d), shared, x, d, m, s))  # noqa: E731
                _, pull, _ = jax.vjp(f, acts[d, m], has_aux=True)
                return pull((dy, dl))[0].astype(act_shape.dtype), zero_g

            def b_weight(_):
                gp, gs, _ = vjp_all(None)
                return zero_dx, (gp, gs)

            def b_full(_):
                gp, gs, dx = vjp_all(None)
                return dx.astype(act_shape.dtype), (gp, gs)

            # Only the kinds this schedule uses are compiled (1F1B: idle and BW; ZB1P: idle, B and
            # W; DualPipe: all four): each branch is one more stage forward and backward to build.
            by_kind = (b_none, b_input, b_weight, b_full)  # indexed as _BKIND numbers them
            branches = [by_kind[k] for k in b_kinds]
            dx, (gp, gs) = jax.lax.switch(row["b_branch"], branches, None)
            g_params = jax.tree.map(lambda acc, g: acc.at[d].add(g), g_params, gp)
            g_shared = jax.tree.map(jnp.add, g_shared, gs)

            # ---- communication ----
            act_l = _shift(y, axis, PP, +1)  # direction-0 activations move right
            act_r = _shift(y, axis, PP, -1)  # direction-1 activations move left
            grad_r = _shift(dx, axis, PP, -1)  # direction-0 input-grads move left
            grad_l = _shift(dx, axis, PP, +1)  # direction-1 input-grads move right

            def put(buf, d, m, value):
                return jax.lax.cond(m >= 0, lambda b: b.at[d, m].set(value), lambda b: b, buf)

            acts = put(acts, 0, row["act_from_left"], act_l)
            acts = put(acts, 1, row["act_from_right"], act_r)
            grads_in = put(grads_in, 0, row["grad_from_right"], grad_r)
            grads_in = put(grads_in, 1, row["grad_from_left"], grad_l)
            return (acts, grads_in, g_params, g_shared, loss, aux), None

        init = (
            zeros_act,
            zeros_act,
            jax.tree.map(jnp.zeros_like, params2),
            jax.tree.map(jnp.zeros_like, shared),
            jnp.zeros((), jnp.float32),
            zeros_aux,
        )
        (_, _, g_params, g_shared, loss, aux), _ = jax.lax.scan(
            step, init, jnp.arange(tab.num_steps)
        )
        # Mirror ranks sum the gradients (and statistics) of their duplicated stages.
        g_stage = jax.tree.map(_merge_mirror, g_params)
        aux = jax.tree.map(_merge_mirror, aux)
        g_shared = jax.tree.map(lambda a: jax.lax.psum(a, axis), g_shared)
        return jax.lax.psum(loss, axis), g_stage, g_shared, aux

    def _merge_mirror(a):
        back = jax.lax.ppermute(a[1], axis, [(i, PP - 1 - i) for i in range(PP)])
        return (a[0] + back)[None]

    spec_stage = jax.tree.map(lambda _: PartitionSpec(axis), stage_params)
    spec_rep = jax.tree.map(lambda _: PartitionSpec(), shared_params)
    spec_inp = jax.tree.map(lambda _: PartitionSpec(), inputs)
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spec_stage, spec_rep, spec_inp),
        out_specs=(PartitionSpec(), spec_stage, spec_rep, PartitionSpec(axis)),
        axis_names={axis},
        check_vma=False,
    )
    return run(stage_params, shared_params, inputs)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the `stage` mesh axis is used (train_main's `pipeline.*` keys).

    Attributes:
      schedule: "none" (no pipelining; mesh.stage must be 1), "1f1b", "zb1p" or "dualpipe".
      microbatches: micro-batches per step (the global batch must divide by it). DualPipe needs
        an even count >= 2 x stages; 1F1B / ZB1P any count >= 1 (>= stages to fill the pipe).
    """

    schedule: str = "none"
    microbatches: int = 1

    def __post_init__(self):
        if self.schedule not in _BUILDERS:
            raise ValueError(
                f"PipelineConfig.schedule={self.schedule!r} is invalid: one of {sorted(_BUILDERS)}"
            )
        if self.microbatches < 1:
            raise ValueError(f"PipelineConfig.microbatches={self.microbatches} must be >= 1")

    def build(self, num_stages: int) -> Schedule | None:
        """The schedule for `num_stages` ranks, or None when not pipelining."""
        if self.schedule == "none":
            if num_stages > 1:
                raise ValueError(
                    f"mesh.stage={num_stages} needs a pipeline.schedule (1f1b, zb1p, dualpipe)"
                )
            return None
        return _BUILDERS[self.schedule](num_stages, self.microbatches)


def _builders():
    from deepseek_jax.sharding import schedules

    return {
        "none": None,
        "1f1b": schedules.one_f_one_b_schedule,
        "zb1p": schedules.zb1p_schedule,
        "dualpipe": schedules.dualpipe_schedule,
    }


_BUILDERS = _builders()
