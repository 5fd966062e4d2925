"""Pipeline-parallel schedules (1F1B, ZB1P, DualPipe) as ordered per-rank operation lists.

A schedule says, for every pipeline rank, which chunk of work it runs next; it says nothing about
time. `pipeline_sim.simulate` turns a schedule plus per-chunk costs into a timeline.

Vocabulary (DeepSeek-V3 report, Section 3.2.1 and Table 2):

* `F` — forward of one model stage for one micro-batch.
* `B` — backward for the *input* only (zero-bubble split); its weight gradient is a later `W`.
* `W` — backward for the *weights* of a stage/micro-batch whose `B` already ran.
* `BW` — full backward (input and weight gradients in one chunk, as in plain 1F1B).
* direction 0 — the pipeline whose micro-batches enter at rank 0 and run stage s on rank s;
  direction 1 (DualPipe only) — micro-batches enter at the last rank and run stage s on rank
  PP-1-s. Rank r therefore holds stages r and PP-1-r under DualPipe (2x parameters).
* micro-batch indices count per direction: DualPipe with `num_microbatches=N` runs micro-batches
  0..N/2-1 in each direction.
* An `F` with `overlap_with_next=True` and the backward that follows it form one overlapped F&B
  slot (DualPipe's computation-communication overlap of a forward and a backward chunk).
"""

from __future__ import annotations

import collections
import dataclasses
import enum

__all__ = [
    "DUALPIPE_PHASES",
    "Op",
    "OpKind",
    "Schedule",
    "dualpipe_phase_counts",
    "dualpipe_phases",
    "dualpipe_schedule",
    "one_f_one_b_schedule",
    "validate_schedule",
    "zb1p_schedule",
]


class OpKind(enum.StrEnum):
    """What a pipeline operation computes (compares equal to its letter, e.g. `"F"`)."""

    F = "F"
    B = "B"
    W = "W"
    BW = "BW"


@dataclasses.dataclass(frozen=True)
class Op:
    """One chunk of pipeline work on one rank.

    Attributes:
        kind: `F`, `B` (input-gradient backward), `W` (weight-gradient backward) or `BW`.
        direction: 0 for the pipeline entering at rank 0, 1 for the one entering at the last rank.
        microbatch: index of the micro-batch within its direction.
        stage: the model stage the op computes (0 is the stage next to the input embedding).
        overlap_with_next: True on an `F` that runs overlapped with the backward listed right
            after it; the two take a single F&B slot.
    """

    kind: OpKind
    direction: int
    microbatch: int
    stage: int
    overlap_with_next: bool = False

    def __post_init__(self):
        if self.kind not in tuple(OpKind):
            raise ValueError(f"Op.kind={self.kind!r} is invalid: one of F, B, W, BW")
        # Normalise plain strings so ops built by hand compare equal to built ones.
        object.__setattr__(self, "kind", OpKind(self.kind))
        if self.direction not in (0, 1):
            raise ValueError(f"Op.direction={self.direction!r} is invalid: 0 or 1")
        if self.microbatch < 0 or self.stage < 0:
            raise ValueError(f"Op microbatch={self.microbatch}, stage={self.stage} must be >= 0")
        if self.overlap_with_next and self.kind != OpKind.F:
            raise ValueError(f"Op.overlap_with_next is only allowed on an F, got kind={self.kind}")

    def __str__(self) -> str:
        # Compact form for timelines and error messages, e.g. "BW1:3@s6".
        return f"{self.kind}{self.direction}:{self.microbatch}@s{self.stage}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Ordered operations of every pipeline rank.

    Attributes:
        name: `"1F1B"`, `"ZB1P"` or `"DualPipe"`.
        num_ranks: PP, the number of pipeline ranks.
        num_microbatches: micro-batches in the whole step, summed over directions.
        num_directions: 1, or 2 for DualPipe's bidirectional pipeline.
        ranks: `ranks[r]` is rank r's operations in execution order.
    """

    name: str
    num_ranks: int
    num_microbatches: int
    num_directions: int
    ranks: tuple[tuple[Op, ...], ...]

    @property
    def num_stages(self) -> int:
        """Model stages per direction; one per rank."""
        return self.num_ranks

    @property
    def microbatches_per_direction(self) -> int:
        return self.num_microbatches // self.num_directions

    def rank_of(self, direction: int, stage: int) -> int:
        """The rank that runs `stage` for micro-batches of `direction`."""
        return stage if direction == 0 else self.num_ranks - 1 - stage


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: an integer >= 1")


# --------------------------------------------------------------------------------------- 1F1B


def one_f_one_b_schedule(num_ranks: int, num_microbatches: int) -> Schedule:
    """Classic non-interleaved 1F1B (PipeDream-Flush) with full backwards.

    Rank r runs min(PP-1-r, N) warm-up forwards, then alternates one F and one `BW` until the
    forwards run out, then drains the remaining backwards. At most PP-r micro-batches are in
    flight on rank r.

    Args:
        num_ranks: PP >= 1.
        num_microbatches: N >= 1.

    Returns:
        The schedule; every op has direction 0 and stage equal to its rank.
    """
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_microbatches", num_microbatches)
    ranks = []
    for r in range(num_ranks):
        warmup = min(num_ranks - 1 - r, num_microbatches)
        ops = [Op(OpKind.F, 0, m, r) for m in range(warmup)]
        for i in range(num_microbatches - warmup):
            ops += [Op(OpKind.F, 0, warmup + i, r), Op(OpKind.BW, 0, i, r)]
        ops += [Op(OpKind.BW, 0, m, r) for m in range(num_microbatches - warmup, num_microbatches)]
        ranks.append(tuple(ops))
    return Schedule("1F1B", num_ranks, num_microbatches, 1, tuple(ranks))


# --------------------------------------------------------------------------------------- ZB1P


def zb1p_schedule(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB1P: the ZB-H1 schedule of Qi et al. 2023 ("Zero Bubble Pipeline Parallelism").

    Same F/B order as 1F1B, but each backward is split into `B` (input gradient, on the
    critical path) and `W` (weight gradient, deferrable). Rank r lets its `W`s lag r micro-batches
    behind its `B`s in the steady state, runs one `W` after every cool-down `B`, and flushes the
    remaining r `W`s at the end. The lag fills the cool-down gaps of 1F1B with weight-gradient
    work; it grows with r exactly as 1F1B's in-flight count PP-r shrinks, so every rank holds at
    most PP activations, the same peak as 1F1B's first rank.

    Args:
        num_ranks: PP >= 1.
        num_microbatches: N >= 1.

    Returns:
        The schedule; every op has direction 0 and stage equal to its rank.
    """
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_microbatches", num_microbatches)
    ranks = []
    for r in range(num_ranks):
        warmup = min(num_ranks - 1 - r, num_microbatches)
        ops = [Op(OpKind.F, 0, m, r) for m in range(warmup)]
        pending: collections.deque[int] = collections.deque()
        for i in range(num_microbatches - warmup):
            ops += [Op(OpKind.F, 0, warmup + i, r), Op(OpKind.B, 0, i, r)]
            pending.append(i)
            if len(pending) > r:
                ops.append(Op(OpKind.W, 0, pending.popleft(), r))
        for m in range(num_microbatches - warmup, num_microbatches):
            # One W after every cool-down B: it fills the wait for the next B from rank r+1.
            pending.append(m)
            ops += [Op(OpKind.B, 0, m, r), Op(OpKind.W, 0, pending.popleft(), r)]
        ops += [Op(OpKind.W, 0, m, r) for m in pending]
        ranks.append(tuple(ops))
    return Schedule("ZB1P", num_ranks, num_microbatches, 1, tuple(ranks))


# ----------------------------------------------------------------------------------- DualPipe

# Phase names of DualPipe's step(), in order; "0" is the rank's near direction (the one whose
# micro-batches enter at the rank's own end of the pipeline), "1" the far one.
DUALPIPE_PHASES = ("F0", "F0F1", "B1W1F1", "F0B1F1B0", "B1F1B0", "B1B0", "WB0", "W")


def _check_dualpipe_sizes(num_ranks: int, num_microbatches: int) -> None:
    if not _is_int(num_ranks) or num_ranks < 2 or num_ranks % 2:
        raise ValueError(
            f"num_ranks={num_ranks!r} is invalid for DualPipe: an even integer >= 2 "
            "(rank r pairs with rank PP-1-r)"
        )
    if not _is_int(num_microbatches) or num_microbatches < 2 * num_ranks or num_microbatches % 2:
        raise ValueError(
            f"num_microbatches={num_microbatches!r} is invalid for DualPipe with "
            f"num_ranks={num_ranks}: an even integer >= 2 * num_ranks = {2 * num_ranks} "
            "(half of the micro-batches run in each direction)"
        )


def dualpipe_phase_counts(num_ranks: int, num_microbatches: int) -> list[dict[str, int]]:
    """Repetition count of each DualPipe phase on each rank.

    With PP ranks, N micro-batches (N/2 per direction) and h = min(r, PP-1-r):

    ========  ==================  =====================================================
    step      phase (one rep)     repetitions on rank r
    ========  ==================  =====================================================
    1         F0                  (PP/2 - h - 1) * 2
    2         F0 F1               h + 1
    3         B1 W F1             PP/2 - h - 1   (B1 split, its W right after)
    4         F0&B1 F1&B0         N/2 - PP + h + 1   (overlapped pairs; the middle ranks
                                  run their first F0 and B1 apart)
    5         B1 F1&B0            PP/2 - h - 1
    6         B1 B0               h + 1   (the second half of these backwards split)
    7         W B0                PP/2 - h - 1   (B0 split)
    8         W                   h + 1
    ========  ==================  =====================================================

    Args:
        num_ranks: PP, even, >= 2.
        num_microbatches: N, even, >= 2 * PP.

    Returns:
        One dict per rank mapping each name in `DUALPIPE_PHASES` to its repetition count.
    """
    _check_dualpipe_sizes(num_ranks, num_microbatches)
    half_ranks, half_chunks = num_ranks // 2, num_microbatches // 2
    counts = []
    for r in range(num_ranks):
        h = min(r, num_ranks - 1 - r)
        counts.append(
            {
                "F0": (half_ranks - h - 1) * 2,
                "F0F1": h + 1,
                "B1W1F1": half_ranks - h - 1,
                "F0B1F1B0": half_chunks - num_ranks + h + 1,
                "B1F1B0": half_ranks - h - 1,
                "B1B0": h + 1,
                "WB0": half_ranks - h - 1,
                "W": h + 1,
            }
        )
    return counts


class _DualPipeRank:
    """Emits one rank's DualPipe ops, tracking per-direction counters like the reference does."""

    def __init__(self, rank: int, num_ranks: int):
        self.rank = rank
        self.num_ranks = num_ranks
        # The second half of the ranks sees direction 1 as its near pipeline.
        self.flip = int(rank >= num_ranks // 2)
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        # Weight gradients of split backwards wait here, first in first out.
        self.pending_w: collections.deque[Op] = collections.deque()
        self.ops: list[Op] = []
        self.phases: list[tuple[str, tuple[Op, ...]]] = []
        self._phase_start = 0

    def _direction(self, phase: int) -> int:
        return phase ^ self.flip

    def _stage(self, direction: int) -> int:
        return self.rank if direction == 0 else self.num_ranks - 1 - self.rank

    def forward(self, phase: int, overlap_with_next: bool = False) -> None:
        d = self._direction(phase)
        self.ops.append(Op(OpKind.F, d, self.next_f[d], self._stage(d), overlap_with_next))
        self.next_f[d] += 1

    def backward(self, phase: int, split: bool = False) -> None:
        d = self._direction(phase)
        op = Op(OpKind.B if split else OpKind.BW, d, self.next_b[d], self._stage(d))
        self.next_b[d] += 1
        self.ops.append(op)
        if split:
            self.pending_w.append(op)

    def weight(self) -> None:
        b = self.pending_w.popleft()
        self.ops.append(Op(OpKind.W, b.direction, b.microbatch, b.stage))

    def forward_backward(self, phase_f: int, phase_b: int) -> None:
        self.forward(phase_f, overlap_with_next=True)
        self.backward(phase_b)

    def close_phase(self, name: str) -> None:
        """Records the ops emitted since the previous phase ended as phase `name`."""
        self.phases.append((name, tuple(self.ops[self._phase_start :])))
        self._phase_start = len(self.ops)


def _dualpipe_rank(rank: int, num_ranks: int, n: dict[str, int]) -> _DualPipeRank:
    """Runs the eight phases of DualPipe's `step()` for one rank; `n` holds the repetitions."""
    rk = _DualPipeRank(rank, num_ranks)
    h = min(rank, num_ranks - 1 - rank)
    is_middle = h == num_ranks // 2 - 1

    for _ in range(n["F0"]):
        rk.forward(0)
    rk.close_phase("F0")

    for _ in range(n["F0F1"]):
        rk.forward(0)
        rk.forward(1)
    rk.close_phase("F0F1")

    for _ in range(n["B1W1F1"]):
        rk.backward(1, split=True)
        rk.weight()
        rk.forward(1)
    rk.close_phase("B1W1F1")

    for i in range(n["F0B1F1B0"]):
        if i == 0 and is_middle:
            # The reference keeps the middle ranks' first F0 and B1 apart: F0 is then not held
            # back until B1's gradient arrives, which shortens the bubble.
            rk.forward(0)
            rk.backward(1)
        else:
            rk.forward_backward(0, 1)
        rk.forward_backward(1, 0)
    rk.close_phase("F0B1F1B0")

    for _ in range(n["B1F1B0"]):
        rk.backward(1)
        rk.forward_backward(1, 0)
    rk.close_phase("B1F1B0")

    split, steps = False, n["B1B0"]
    for i in range(steps):
        # From the middle of this phase on, backwards split off their W so that the W's can
        # fill the drain; the parity of h picks whether B1 or B0 splits first, so that exactly
        # h+1 backwards split.
        if i == steps // 2 and h % 2 == 1:
            split = True
        rk.backward(1, split=split)
        if i == steps // 2 and h % 2 == 0:
            split = True
        rk.backward(0, split=split)
    rk.close_phase("B1B0")

    for _ in range(n["WB0"]):
        rk.weight()
        rk.backward(0, split=True)
    rk.close_phase("WB0")

    for _ in range(n["W"]):
        rk.weight()
    rk.close_phase("W")

    if rk.pending_w:
        raise AssertionError(f"DualPipe rank {rank} left {len(rk.pending_w)} W ops unscheduled")
    return rk


def dualpipe_phases(
    num_ranks: int, num_microbatches: int
) -> list[list[tuple[str, tuple[Op, ...]]]]:
    """DualPipe's ops on every rank, grouped by the eight phases of DeepSeek's `step()`.

    Follows the algorithm of deepseek-ai/DualPipe (`DualPipe.step`): "0" is the rank's near
    direction, "1" the far one. Backwards overlapped with a forward are full backwards (`BW`);
    zero-bubble backwards (`B`) queue their `W`, which later `W` ops pop first in first out.
    Communication is not represented: a consumer may run as soon as its producer finished.
    See `dualpipe_phase_counts` for how many times each phase repeats.

    Args:
        num_ranks: PP, even, >= 2.
        num_microbatches: N, even, >= 2 * PP; N/2 run in each direction.

    Returns:
        `phases[r]` lists (phase name, ops) for rank r in `DUALPIPE_PHASES` order.
    """
    counts = dualpipe_phase_counts(num_ranks, num_microbatches)
    return [_dualpipe_rank(r, num_ranks, counts[r]).phases for r in range(num_ranks)]


def dualpipe_schedule(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe (DeepSeek-V3 report, Section 3.2.1; deepseek-ai/DualPipe).

    Two pipelines run at once in opposite directions over the same ranks; rank r holds stage r
    of direction 0 and stage PP-1-r of direction 1. Its eight phases (forward warm-up, a
    zero-bubble ramp, the F&B-overlapped steady state, and a drain whose W's fill the bubbles)
    are listed with their repetition counts in `dualpipe_phase_counts`.

    Args:
        num_ranks: PP, even, >= 2.
        num_microbatches: N, even, >= 2 * PP; micro-batches 0..N/2-1 run in each direction.

    Returns:
        The schedule, with overlapped F&B pairs marked by `Op.overlap_with_next`.

    Raises:
        ValueError: if PP is odd or N is odd or smaller than 2 * PP.
    """
    phases = dualpipe_phases(num_ranks, num_microbatches)
    ranks = tuple(tuple(op for _, ops in rank for op in ops) for rank in phases)
    return Schedule("DualPipe", num_ranks, num_microbatches, 2, ranks)


# ----------------------------------------------------------------------------------- checking


def validate_schedule(schedule: Schedule) -> None:
    """Checks that a schedule computes every stage of every micro-batch exactly once.

    Every (direction, micro-batch, stage) must have one `F` and either one `BW` or one `B` and
    one `W`, all on the rank that holds that stage, with F before the backward and B before W in
    the rank's order; an overlap flag must be followed by a backward.

    Raises:
        ValueError: naming the first offending rank and op.
    """
    p, dirs = schedule.num_ranks, schedule.num_directions
    per_dir = schedule.microbatches_per_direction
    seen: dict[tuple[int, int, int], list[OpKind]] = collections.defaultdict(list)
    for r, ops in enumerate(schedule.ranks):
        for i, op in enumerate(ops):
            where = f"{schedule.name} rank {r} op {i} ({op})"
            if op.direction >= dirs or op.microbatch >= per_dir or op.stage >= p:
                raise ValueError(
                    f"{where}: out of range for {dirs} direction(s), {per_dir} "
                    f"micro-batches per direction and {p} stages"
                )
            if schedule.rank_of(op.direction, op.stage) != r:
                raise ValueError(
                    f"{where}: stage {op.stage} of direction {op.direction} runs "
                    f"on rank {schedule.rank_of(op.direction, op.stage)}"
                )
            if op.overlap_with_next and (
                i + 1 == len(ops) or ops[i + 1].kind not in (OpKind.B, OpKind.BW)
            ):
                raise ValueError(f"{where}: overlap_with_next must be followed by a B or BW")
            done = seen[(op.direction, op.microbatch, op.stage)]
            needs = {
                OpKind.F: [],
                OpKind.BW: [OpKind.F],
                OpKind.B: [OpKind.F],
                OpKind.W: [OpKind.F, OpKind.B],
            }[op.kind]
            if done != needs:
                raise ValueError(
                    f"{where}: runs after {[str(k) for k in done]}, "
                    f"expected after {[str(k) for k in needs]}"
                )
            done.append(op.kind)
    for d in range(dirs):
        for m in range(per_dir):
            for s in range(p):
                if seen[(d, m, s)] not in ([OpKind.F, OpKind.BW], [OpKind.F, OpKind.B, OpKind.W]):
                    raise ValueError(
                        f"{schedule.name}: direction {d} micro-batch {m} stage {s} "
                        f"ran {[str(k) for k in seen[(d, m, s)]]}, expected F BW "
                        "or F B W"
                    )
