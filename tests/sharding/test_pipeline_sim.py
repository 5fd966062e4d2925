"""Tests for sharding/pipeline_sim.py: event times, dependencies, memory and Table 2's formulas."""

import dataclasses
import importlib.util
import pathlib

import pytest

from deepseek_jax.sharding.pipeline_sim import (
    Costs,
    report_activations,
    report_bubble,
    report_parameters,
    simulate,
    timeline,
)
from deepseek_jax.sharding.schedules import (
    Op,
    OpKind,
    Schedule,
    dualpipe_schedule,
    one_f_one_b_schedule,
    zb1p_schedule,
)

BUILDERS = {"1F1B": one_f_one_b_schedule, "ZB1P": zb1p_schedule, "DualPipe": dualpipe_schedule}
REPO = pathlib.Path(__file__).resolve().parents[2]


def _close(a: float, b: float) -> bool:
    # Costs below are dyadic fractions, so event times are exact in float; the slack only
    # guards against a future non-dyadic case.
    return abs(a - b) < 1e-9


# ------------------------------------------------------------------------------- event times


def test_1f1b_two_ranks_by_hand():
    # F=1, B=2: rank 0 runs F0 F1 BW0 BW1, rank 1 runs F0 BW0 F1 BW1.
    result = simulate(one_f_one_b_schedule(2, 2), Costs(f=1, b=2, w=0.5))
    times = [[(s, e, str(op)) for s, e, op in tl] for tl in result.timeline]
    assert times[0] == [(0, 1, "F0:0@s0"), (1, 2, "F0:1@s0"), (4, 6, "BW0:0@s0"),
                        (7, 9, "BW0:1@s0")]  # fmt: skip
    assert times[1] == [(1, 2, "F0:0@s1"), (2, 4, "BW0:0@s1"), (4, 5, "F0:1@s1"),
                        (5, 7, "BW0:1@s1")]  # fmt: skip
    assert result.makespan == 9
    assert result.busy == (6, 6)
    assert result.bubble == (3, 3)  # (PP-1)(F+B)
    assert result.peak_activations == (2, 1)


def test_zb1p_two_ranks_by_hand():
    # Split B costs b - w = 1 and W costs 1; rank 1 defers its first W past the next F.
    result = simulate(zb1p_schedule(2, 2), Costs(f=1, b=2, w=1))
    times = [[(s, e, str(op)) for s, e, op in tl] for tl in result.timeline]
    assert times[1] == [(1, 2, "F0:0@s1"), (2, 3, "B0:0@s1"), (3, 4, "F0:1@s1"),
                        (4, 5, "B0:1@s1"), (5, 6, "W0:0@s1"), (6, 7, "W0:1@s1")]  # fmt: skip
    assert times[0] == [(0, 1, "F0:0@s0"), (1, 2, "F0:1@s0"), (3, 4, "B0:0@s0"),
                        (4, 5, "W0:0@s0"), (5, 6, "B0:1@s0"), (6, 7, "W0:1@s0")]  # fmt: skip
    assert result.bubble == (1, 1)  # (PP-1)(F+B-2W)


def test_overlapped_pair_takes_one_slot():
    s = dualpipe_schedule(2, 4)
    result = simulate(s, Costs(f=1, b=2, w=1, fb=2.5))
    for tl in result.timeline:
        for (s0, e0, op), (s1, e1, nxt) in zip(tl, tl[1:], strict=False):
            if op.overlap_with_next:
                assert (s0, e0) == (s1, e1)
                assert e0 - s0 == 2.5
                assert nxt.kind in (OpKind.B, OpKind.BW)
    # DualPipe with two ranks has no bubble at all.
    assert result.bubble == (0, 0)


def test_p2p_latency_delays_cross_rank_dependencies():
    costs = Costs(f=1, b=2, w=0)
    result = simulate(one_f_one_b_schedule(2, 1), costs, p2p_latency=0.25)
    # F on rank 0, hop, F and BW on rank 1, hop, BW on rank 0.
    assert result.makespan == 1 + 0.25 + 1 + 2 + 0.25 + 2
    with pytest.raises(ValueError, match=r"p2p_latency=-1 is invalid"):
        simulate(one_f_one_b_schedule(2, 1), costs, p2p_latency=-1)


def test_timeline_function_matches_simulate():
    s, costs = dualpipe_schedule(4, 8), Costs(1, 2, 1)
    assert timeline(s, costs) == simulate(s, costs).timeline


def _deps(op: Op, num_stages: int):
    """Predicates matching the ops `op` must wait for, written out from the issue's spec."""
    d, m, s = op.direction, op.microbatch, op.stage

    def key(kinds, stage):
        return lambda o: o.kind in kinds and (o.direction, o.microbatch, o.stage) == (d, m, stage)

    if op.kind == OpKind.F:
        return [key({OpKind.F}, s - 1)] if s > 0 else []
    if op.kind == OpKind.W:
        return [key({OpKind.B}, s)]
    deps = [key({OpKind.F}, s)]
    if s + 1 < num_stages:
        deps.append(key({OpKind.B, OpKind.BW}, s + 1))
    return deps


@pytest.mark.parametrize(
    "method, p, n",
    [("1F1B", 4, 7), ("ZB1P", 4, 7), ("ZB1P", 8, 16), ("DualPipe", 4, 10), ("DualPipe", 8, 20)],
)
@pytest.mark.parametrize("costs", [Costs(1, 2, 1), Costs(2, 2, 1, fb=3), Costs(1, 3, 0.5)])
def test_simulated_timeline_respects_dependencies(method, p, n, costs):
    schedule = BUILDERS[method](p, n)
    result = simulate(schedule, costs)
    entries = [(s, e, op, r) for r, tl in enumerate(result.timeline) for s, e, op in tl]
    assert sorted(str(op) for *_, op, _ in entries) == sorted(
        str(op) for ops in schedule.ranks for op in ops
    )
    for r, tl in enumerate(result.timeline):
        # Ops keep their listed order, and slots on a rank never overlap.
        assert [op for *_, op in tl] == list(schedule.ranks[r])
        slots = sorted({(s, e) for s, e, _ in tl})
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(slots, slots[1:], strict=False))
        busy = sum(e - s for s, e in slots)
        assert _close(busy, result.busy[r])
        assert _close(result.bubble[r], result.makespan - busy)
    for start, _, op, _ in entries:
        for matches in _deps(op, p):
            (dep_end,) = [e for _, e, o, _ in entries if matches(o)]
            assert start >= dep_end - 1e-12, f"{op} starts at {start} before its input ({dep_end})"


def test_deadlock_is_reported():
    # Rank 0 wants micro-batch 0's gradient before sending micro-batch 1 forward, while rank 1
    # insists on micro-batch 1 first: a valid op list per stage, but a cyclic wait.
    rank0 = (Op("F", 0, 0, 0), Op("BW", 0, 0, 0), Op("F", 0, 1, 0), Op("BW", 0, 1, 0))
    rank1 = (Op("F", 0, 1, 1), Op("F", 0, 0, 1), Op("BW", 0, 0, 1), Op("BW", 0, 1, 1))
    schedule = Schedule("custom", 2, 2, 1, (rank0, rank1))
    with pytest.raises(
        ValueError,
        match=r"custom deadlocks; waiting ops: rank 0: BW0:0@s0; "
        r"rank 1: F0:1@s1",
    ):
        simulate(schedule, Costs(1, 2, 1))


# ----------------------------------------------------------------------- Table 2: 1F1B, ZB1P


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("n_rel", [-1, 0, 1, 2])
@pytest.mark.parametrize(
    "costs", [Costs(1, 1, 0), Costs(2, 2, 1), Costs(1, 2, 1), Costs(3, 1, 0.5), Costs(1, 4, 4)]
)
def test_1f1b_bubble_is_exact_for_all_costs(p, n_rel, costs):
    # N below, at and above PP: 1F1B's bubble is (PP-1)(F+B) on every rank regardless.
    n = max(1, p + n_rel * p // 2)
    result = simulate(one_f_one_b_schedule(p, n), costs)
    assert all(_close(b, report_bubble("1F1B", p, costs)) for b in result.bubble)
    assert result.peak_activations == tuple(min(p - r, n) for r in range(p))


@pytest.mark.parametrize("p", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("n_rel", [0, 1, 3])
@pytest.mark.parametrize(
    "costs",
    # W <= F and W <= B - W: the regime where ZB-H1's W's exactly fill 1F1B's cool-down gaps.
    [Costs(2, 2, 1), Costs(1, 2, 1), Costs(3, 3, 1), Costs(1, 1, 0.5), Costs(3, 4, 1.5),
     Costs(1, 1, 0), Costs(0.5, 3, 0.5)],
)  # fmt: skip
def test_zb1p_bubble_is_exact_when_w_fits(p, n_rel, costs):
    n = p + n_rel * p
    result = simulate(zb1p_schedule(p, n), costs)
    assert all(_close(b, report_bubble("ZB1P", p, costs)) for b in result.bubble)
    assert result.peak_activations == (p,) * p  # the W lag keeps every rank at PP


@pytest.mark.parametrize("p", [4, 8])
@pytest.mark.parametrize("costs", [Costs(1, 1, 1), Costs(0.5, 2, 1), Costs(2, 3, 2)])
def test_zb1p_formula_underestimates_when_w_is_long(p, costs):
    # W > F or W > B - W: the W's cannot hide in the gaps, the true bubble is larger.
    result = simulate(zb1p_schedule(p, 2 * p), costs)
    assert result.max_bubble > report_bubble("ZB1P", p, costs) + 1e-9


# ------------------------------------------------------------------------- Table 2: DualPipe

# F = B - W >= W: forward as long as the input-gradient backward (the zero-bubble assumption).
DUALPIPE_EXACT = [
    Costs(1, 2, 1),
    Costs(2, 3, 1),
    Costs(2, 2, 0),
    Costs(3, 6, 3),
    Costs(2, 3.5, 1.5),
]


def _with_fb(costs: Costs, where: str) -> Costs:
    lo, hi = max(costs.f, costs.b), costs.f + costs.b
    return dataclasses.replace(costs, fb={"none": None, "max": lo, "mid": (lo + hi) / 2}[where])


@pytest.mark.parametrize("p, n", [(2, 4), (4, 8), (4, 14), (6, 12), (8, 16), (8, 20), (16, 32),
                                  (16, 64)])  # fmt: skip
@pytest.mark.parametrize("costs", DUALPIPE_EXACT)
@pytest.mark.parametrize("fb", ["none", "max", "mid"])
def test_dualpipe_bubble_is_exact_when_forward_equals_input_backward(p, n, costs, fb):
    costs = _with_fb(costs, fb)
    result = simulate(dualpipe_schedule(p, n), costs)
    formula = report_bubble("DualPipe", p, costs)
    assert _close(result.max_bubble, formula)
    # Ranks nearer the ends overlap fewer F&B pairs and so idle less, by F+B-F&B per pair.
    saving = costs.f + costs.b - costs.overlapped
    for r, bubble in enumerate(result.bubble):
        h = min(r, p - 1 - r)
        fewer_pairs = p // 2 - 2 - min(h, p // 2 - 2)
        assert _close(bubble, formula - fewer_pairs * saving)
    assert result.peak_activations == (p + 1,) * p


@pytest.mark.parametrize("p", [4, 6, 8, 16])
@pytest.mark.parametrize("costs", [Costs(2, 2, 1), Costs(3, 3, 1), Costs(1, 1, 0.5),
                                   Costs(3, 3, 0.5), Costs(3, 2, 1)])  # fmt: skip
@pytest.mark.parametrize("fb", ["none", "mid"])
def test_dualpipe_with_forward_longer_than_input_backward(p, costs, fb):
    # F > B - W >= W: the faithful run idles (PP/2-1)(F&B+F-2W), i.e. Table 2's formula plus
    # (PP/2-1)(F-(B-W)); e.g. F=B=2, W=1 gives (PP/2-1)(F&B+2), not (PP/2-1)(F&B+1).
    costs = _with_fb(costs, fb)
    result = simulate(dualpipe_schedule(p, 2 * p + 2), costs)
    expected = (p / 2 - 1) * (costs.overlapped + costs.f - 2 * costs.w)
    assert _close(result.max_bubble, expected)
    excess = (p / 2 - 1) * (costs.f - (costs.b - costs.w))
    assert _close(result.max_bubble - report_bubble("DualPipe", p, costs), excess)


@pytest.mark.parametrize("p", [4, 8, 16])
@pytest.mark.parametrize("costs", [Costs(1, 3, 1), Costs(1, 2, 0.5), Costs(2, 6, 2)])
def test_dualpipe_formula_bounds_runs_with_shorter_forward(p, costs):
    # W <= F < B - W: Table 2's formula is an upper bound of the worst rank's bubble.
    result = simulate(dualpipe_schedule(p, 3 * p), costs)
    assert result.max_bubble <= report_bubble("DualPipe", p, costs) + 1e-9


@pytest.mark.parametrize("method", list(BUILDERS))
@pytest.mark.parametrize("p", [4, 8])
def test_memory_columns_of_table_2(method, p):
    schedule = BUILDERS[method](p, 3 * p if method != "DualPipe" else 4 * p)
    result = simulate(schedule, Costs(1, 2, 1))
    assert result.max_peak_activations == report_activations(method, p)
    # Parameter copies: the distinct model stages each rank holds.
    stages = {len({op.stage for op in ops}) for ops in schedule.ranks}
    assert stages == {report_parameters(method)}


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(f=-1, b=1, w=0), r"Costs.f=-1 is invalid: a finite number >= 0"),
        (dict(f=1, b=float("inf"), w=0), r"Costs.b=inf is invalid"),
        (dict(f=1, b=1, w=2), r"Costs.w=2 is invalid: at most b=1"),
        (
            dict(f=1, b=2, w=1, fb=1.5),
            r"Costs.fb=1.5 is invalid: None or a finite number >= "
            r"max\(f, b\) = 2",
        ),
    ],
)
def test_costs_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Costs(**kwargs)


def test_report_formulas_reject_unknown_method():
    for fn, args in ((report_bubble, (4, Costs(1, 2, 1))), (report_activations, (4,)),
                     (report_parameters, ())):  # fmt: skip
        with pytest.raises(ValueError, match=r"method='GPipe' is invalid: one of 1F1B, ZB1P"):
            fn("GPipe", *args)


def test_simulate_validates_the_schedule():
    s = one_f_one_b_schedule(2, 2)
    broken = Schedule(s.name, 2, 2, 1, (s.ranks[0], s.ranks[1][:-1]))
    with pytest.raises(ValueError, match=r"micro-batch 1 stage 1 ran \['F'\]"):
        simulate(broken, Costs(1, 2, 1))


# ------------------------------------------------------------------------------------- bench


def test_bench_script_prints_table_and_writes_a_timeline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "pipeline_bubbles", REPO / "bench" / "pipeline_bubbles.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--f", "1", "--b", "2", "--w", "1", "--timeline", str(tmp_path / "t.svg"),
                "--timeline-pp", "4", "--timeline-n", "8", "--ascii"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| DualPipe | 16 | 14 | 14 | yes |" in out
    assert "| ZB1P | 8 | 7 | 7 | yes |" in out
    assert "rank  3" in out
    svg = (tmp_path / "t.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") > 3 * 4 * 8
