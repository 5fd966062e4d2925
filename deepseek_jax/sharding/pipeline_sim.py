"""Event simulation of pipeline schedules: makespan, bubble and activation memory per rank.

Cost model (the notation of the DeepSeek-V3 report, Table 2):

* `f` (F) — one forward chunk; `b` (B) — one *full* backward chunk (input and weight
  gradients); `w` (W) — the weight-gradient part of it. A split `B` op therefore costs `b - w`,
  a `W` op `w`, a `BW` op `b`. The zero-bubble paper's "T_F = T_B = T_W" is `f=1, b=2, w=1` here.
* `fb` (F&B) — one overlapped slot of a forward and a full backward; defaults to `f + b`
  (overlap that hides communication but saves no compute), must be at least `max(f, b)`.
* point-to-point latency defaults to zero: a consumer may start the instant its producer ends.

Dependencies: `F` of stage s waits for `F` of stage s-1 of the same micro-batch and direction
(on the neighbouring rank); a backward (`B` or `BW`) of stage s waits for its own `F` and for
the backward of stage s+1; `W` waits for its `B`. Each rank runs its ops one at a time in
listed order; an overlapped pair starts when both of its ops are ready and holds the rank `fb`.

Activation convention: a (direction, micro-batch, stage) activation is live on its rank from
the start of its `F` to the end of its `W` (or `BW`), counted in units of one stage-microbatch
activation. An overlapped F&B slot therefore holds, while it runs, both the activation it
creates and the one it frees.

What the simulation reproduces of Table 2 (PP ranks, N micro-batches in all; bubble of a rank
= makespan - its busy time). Every claim below is checked in tests/sharding/test_pipeline_sim.py.

* 1F1B, (PP-1)(F+B): exact on every rank for every f, b, w and every N >= 1; F = B is not
  needed once point-to-point latency is zero.
* ZB1P, (PP-1)(F+B-2W): exact on every rank when W <= F and W <= B - W (a weight-gradient
  chunk is no longer than a forward or an input-gradient chunk) and N >= PP, e.g. f=b=2, w=1
  or f=1, b=2, w=1. Outside that regime the cool-down W's no longer fill the 1F1B gaps and the
  simulated bubble is strictly larger than the formula.
* DualPipe, (PP/2-1)(F&B+B-3W): exact, as the bubble of the worst rank, when F = B - W >= W
  (forward as long as the input-gradient backward, the zero-bubble paper's assumption) for
  every even PP, every valid N and every F&B in [max(F, B), F+B]. With F&B = F+B every rank
  has that bubble; with a cheaper F&B the ranks near the pipeline ends overlap fewer pairs, so
  rank r (h = min(r, PP-1-r)) idles (PP/2-2-min(h, PP/2-2))(F+B-F&B) less. Outside the regime
  the formula is not what a faithful run gives: with F > B - W >= W the worst bubble is
  (PP/2-1)(F&B+F-2W), larger than the formula by (PP/2-1)(F-(B-W)) (e.g. f=b=2, w=1 gives
  (PP/2-1)(F&B+2), not (PP/2-1)(F&B+1)); with W <= F < B - W it is at most the formula and
  no longer linear in PP. PP = 2 has no bubble at all.
* Activations: 1F1B and ZB1P peak at PP (on rank 0, and on every rank for ZB1P); DualPipe
  peaks at PP+1 on every rank. Parameters (1x, 1x, 2x) follow from the stage placement.
"""

from __future__ import annotations

import dataclasses
import math

from deepseek_jax.sharding.schedules import Op, OpKind, Schedule, validate_schedule

__all__ = [
    "Costs",
    "SimResult",
    "TimelineEntry",
    "report_activations",
    "report_bubble",
    "report_parameters",
    "simulate",
    "timeline",
]

# (start, end, op) of one executed op.
TimelineEntry = tuple[float, float, Op]

METHODS = ("1F1B", "ZB1P", "DualPipe")


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per-chunk execution times, in any consistent unit.

    Attributes:
        f: forward chunk (F).
        b: full backward chunk (B): input plus weight gradient.
        w: weight-gradient part of `b` (W); a split `B` op costs `b - w`.
        fb: an overlapped forward + full backward slot (F&B); None means `f + b`.
    """

    f: float
    b: float
    w: float
    fb: float | None = None

    def __post_init__(self):
        for name in ("f", "b", "w"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Costs.{name}={value!r} is invalid: a finite number >= 0")
        if self.w > self.b:
            raise ValueError(
                f"Costs.w={self.w!r} is invalid: at most b={self.b!r} (W is part of the full "
                "backward B)"
            )
        if self.fb is not None and not (math.isfinite(self.fb) and self.fb >= max(self.f, self.b)):
            raise ValueError(
                f"Costs.fb={self.fb!r} is invalid: None or a finite number >= max(f, b) = "
                f"{max(self.f, self.b)!r} (an overlapped pair cannot beat its longer half)"
            )

    @property
    def overlapped(self) -> float:
        """Cost of one overlapped F&B slot."""
        return self.f + self.b if self.fb is None else self.fb

    def of(self, kind: OpKind) -> float:
        """Cost of one op of `kind` run on its own."""
        return {
            OpKind.F: self.f,
            OpKind.B: self.b - self.w,
            OpKind.W: self.w,
            OpKind.BW: self.b,
        }[kind]


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Outcome of simulating one schedule.

    Attributes:
        makespan: time from the first op's start (0) to the last op's end.
        busy: per rank, the time it computes (an overlapped pair counts once, as `fb`).
        bubble: per rank, `makespan - busy`.
        peak_activations: per rank, the most stage-microbatch activations live at once.
        timeline: per rank, `(start, end, op)` in execution order; both ops of an overlapped
            pair carry the pair's interval.
    """

    makespan: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]
    peak_activations: tuple[int, ...]
    timeline: tuple[tuple[TimelineEntry, ...], ...]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def max_peak_activations(self) -> int:
        return max(self.peak_activations)


def _slots(ops: tuple[Op, ...]) -> list[tuple[Op, ...]]:
    """Groups a rank's ops into execution slots: single ops and overlapped (F, backward) pairs."""
    slots, i = [], 0
    while i < len(ops):
        n = 2 if ops[i].overlap_with_next else 1
        slots.append(ops[i : i + n])
        i += n
    return slots


# Dependency keys: ("F" | "grad" | "B", direction, micro-batch, stage). "grad" is the input
# gradient a stage hands to the stage before it, produced by either a split B or a full BW.
_Key = tuple[str, int, int, int]


def _dependencies(op: Op, num_stages: int) -> list[tuple[_Key, bool]]:
    """(key, crosses ranks) pairs whose end `op` waits for."""
    d, m, s = op.direction, op.microbatch, op.stage
    if op.kind == OpKind.F:
        return [(("F", d, m, s - 1), True)] if s > 0 else []
    if op.kind == OpKind.W:
        return [(("B", d, m, s), False)]
    deps = [(("F", d, m, s), False)]
    if s + 1 < num_stages:
        deps.append((("grad", d, m, s + 1), True))
    return deps


def _produces(op: Op) -> list[_Key]:
    d, m, s = op.direction, op.microbatch, op.stage
    return {
        OpKind.F: [("F", d, m, s)],
        OpKind.B: [("B", d, m, s), ("grad", d, m, s)],
        OpKind.BW: [("grad", d, m, s)],
        OpKind.W: [],
    }[op.kind]


def simulate(schedule: Schedule, costs: Costs, p2p_latency: float = 0.0) -> SimResult:
    """Runs `schedule` with `costs`; see the module docstring for the model.

    Every slot starts at the latest of its rank's previous end and its dependencies' ends (plus
    `p2p_latency` for those produced on another rank); ops never reorder within a rank.

    Args:
        schedule: a valid schedule (checked with `validate_schedule`).
        costs: per-chunk execution times.
        p2p_latency: delay between an op's end and its consumer's earliest start on the
            neighbouring rank; Table 2's formulas assume 0.

    Returns:
        Makespan, per-rank busy time, bubble, peak activations and timeline.

    Raises:
        ValueError: if the schedule is invalid or deadlocks (a rank waits for an op that its
            producer's rank only reaches later), naming the stuck ops.
    """
    if not (math.isfinite(p2p_latency) and p2p_latency >= 0):
        raise ValueError(f"p2p_latency={p2p_latency!r} is invalid: a finite number >= 0")
    validate_schedule(schedule)
    num_ranks, num_stages = schedule.num_ranks, schedule.num_stages
    slots = [_slots(ops) for ops in schedule.ranks]
    cursor = [0] * num_ranks
    clock = [0.0] * num_ranks
    busy = [0.0] * num_ranks
    ends: dict[_Key, float] = {}
    timelines: list[list[TimelineEntry]] = [[] for _ in range(num_ranks)]

    # Ranks run in order and a start only depends on ends already known, so sweeping the ranks
    # and advancing each as far as its dependencies allow yields the exact event times.
    remaining = sum(len(s) for s in slots)
    while remaining:
        progressed = False
        for r in range(num_ranks):
            while cursor[r] < len(slots[r]):
                slot = slots[r][cursor[r]]
                # The two ops of a pair never depend on each other (different micro-batches).
                deps = [dep for op in slot for dep in _dependencies(op, num_stages)]
                if any(key not in ends for key, _ in deps):
                    break
                start = max([clock[r]] + [ends[k] + (p2p_latency if x else 0.0) for k, x in deps])
                cost = costs.overlapped if len(slot) == 2 else costs.of(slot[0].kind)
                end = start + cost
                for op in slot:
                    ends.update(dict.fromkeys(_produces(op), end))
                    timelines[r].append((start, end, op))
                clock[r], busy[r] = end, busy[r] + cost
                cursor[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [
                f"rank {r}: {' & '.join(map(str, slots[r][cursor[r]]))}"
                for r in range(num_ranks)
                if cursor[r] < len(slots[r])
            ]
            raise ValueError(f"{schedule.name} deadlocks; waiting ops: {'; '.join(stuck)}")

    makespan = max((tl[-1][1] for tl in timelines if tl), default=0.0)
    return SimResult(
        makespan=makespan,
        busy=tuple(busy),
        bubble=tuple(makespan - x for x in busy),
        peak_activations=tuple(_peak_activations(s) for s in slots),
        timeline=tuple(tuple(tl) for tl in timelines),
    )


def _peak_activations(slots: list[tuple[Op, ...]]) -> int:
    # Within a slot every F starts before any of the slot's backwards ends, so count the slot's
    # new activations before releasing the ones its W/BW finishes.
    live = peak = 0
    for slot in slots:
        live += sum(op.kind == OpKind.F for op in slot)
        peak = max(peak, live)
        live -= sum(op.kind in (OpKind.W, OpKind.BW) for op in slot)
    return peak


def timeline(
    schedule: Schedule, costs: Costs, p2p_latency: float = 0.0
) -> tuple[tuple[TimelineEntry, ...], ...]:
    """Per-rank `(start, end, op)` lists of the simulated run, for plotting."""
    return simulate(schedule, costs, p2p_latency).timeline


# ----------------------------------------------------------------------- DeepSeek-V3 Table 2


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: one of {', '.join(METHODS)}")


def report_bubble(method: str, num_ranks: int, costs: Costs) -> float:
    """Bubble as DeepSeek-V3's Table 2 states it.

    Args:
        method: "1F1B", "ZB1P" or "DualPipe".
        num_ranks: PP.
        costs: F = `costs.f`, B = `costs.b` (full backward), W = `costs.w`,
            F&B = `costs.overlapped`.

    Returns:
        (PP-1)(F+B), (PP-1)(F+B-2W) or (PP/2-1)(F&B+B-3W).
    """
    _check_method(method)
    f, b, w, fb = costs.f, costs.b, costs.w, costs.overlapped
    if method == "1F1B":
        return (num_ranks - 1) * (f + b)
    if method == "ZB1P":
        return (num_ranks - 1) * (f + b - 2 * w)
    return (num_ranks / 2 - 1) * (fb + b - 3 * w)


def report_activations(method: str, num_ranks: int) -> int:
    """Peak activations per rank from Table 2: PP, PP, PP+1 (stage-microbatch units)."""
    _check_method(method)
    return num_ranks + 1 if method == "DualPipe" else num_ranks


def report_parameters(method: str) -> int:
    """Model-stage parameter copies per rank from Table 2: 1, 1, 2."""
    _check_method(method)
    return 2 if method == "DualPipe" else 1
