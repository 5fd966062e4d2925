"""Tests for sharding/schedules.py: op coverage, placement, ordering and DualPipe's phases."""

import collections
import dataclasses

import pytest

from deepseek_jax.sharding.schedules import (
    DUALPIPE_PHASES,
    Op,
    OpKind,
    Schedule,
    dualpipe_phase_counts,
    dualpipe_phases,
    dualpipe_schedule,
    one_f_one_b_schedule,
    validate_schedule,
    zb1p_schedule,
)

SIZES_1D = [(1, 1), (2, 1), (2, 5), (4, 3), (4, 8), (8, 8), (8, 19), (16, 32)]
SIZES_DUAL = [(2, 4), (2, 6), (4, 8), (4, 10), (6, 12), (8, 16), (8, 20), (16, 32), (16, 50)]


ALL_CASES = [
    pytest.param(build, p, n, id=f"{build.__name__.removesuffix('_schedule')}-{p}-{n}")
    for sizes, builders in (
        (SIZES_1D, (one_f_one_b_schedule, zb1p_schedule)),
        (SIZES_DUAL, (dualpipe_schedule,)),
    )
    for p, n in sizes
    for build in builders
]


@pytest.mark.parametrize("build, p, n", ALL_CASES)
def test_every_microbatch_stage_runs_forward_and_backward_once(build, p, n):
    schedule = build(p, n)
    validate_schedule(schedule)
    # Independent recount: one F, and one BW or one B plus one W, per (direction, mb, stage).
    count = collections.Counter(
        (op.kind, op.direction, op.microbatch, op.stage) for ops in schedule.ranks for op in ops
    )
    per_dir = schedule.num_microbatches // schedule.num_directions
    for d in range(schedule.num_directions):
        for m in range(per_dir):
            for s in range(schedule.num_ranks):
                assert count[(OpKind.F, d, m, s)] == 1
                full, split = count[(OpKind.BW, d, m, s)], count[(OpKind.B, d, m, s)]
                assert (full, split) in ((1, 0), (0, 1))
                assert count[(OpKind.W, d, m, s)] == split
    assert sum(count.values()) == sum(len(ops) for ops in schedule.ranks)


@pytest.mark.parametrize("build, p, n", ALL_CASES)
def test_ops_run_on_the_rank_holding_their_stage_in_microbatch_order(build, p, n):
    schedule = build(p, n)
    for r, ops in enumerate(schedule.ranks):
        for op in ops:
            assert op.stage == (r if op.direction == 0 else p - 1 - r)
        # Forwards, and backwards, each take a direction's micro-batches in order.
        for kinds in ({OpKind.F}, {OpKind.B, OpKind.BW}):
            for d in range(schedule.num_directions):
                mbs = [op.microbatch for op in ops if op.kind in kinds and op.direction == d]
                assert mbs == sorted(mbs)


@pytest.mark.parametrize("p, n", SIZES_1D)
def test_1f1b_shape(p, n):
    s = one_f_one_b_schedule(p, n)
    assert (s.name, s.num_directions, s.num_stages) == ("1F1B", 1, p)
    for r, ops in enumerate(s.ranks):
        kinds = [op.kind for op in ops]
        warmup = min(p - 1 - r, n)
        assert kinds[:warmup] == ["F"] * warmup
        assert kinds[warmup : warmup + 2 * (n - warmup)] == ["F", "BW"] * (n - warmup)
        assert kinds[len(kinds) - warmup :] == ["BW"] * warmup


@pytest.mark.parametrize("p, n", SIZES_1D)
def test_zb1p_is_1f1b_with_split_backwards(p, n):
    zb, base = zb1p_schedule(p, n), one_f_one_b_schedule(p, n)
    for r in range(p):
        # Dropping the W's and fusing B back into BW gives 1F1B exactly.
        fused = [
            dataclasses.replace(op, kind=OpKind.BW) if op.kind == OpKind.B else op
            for op in zb.ranks[r]
            if op.kind != OpKind.W
        ]
        assert fused == list(base.ranks[r])


def test_zb1p_defers_w_by_rank_index():
    s = zb1p_schedule(4, 8)
    # Rank 3 (last) keeps its W's three micro-batches behind its B's; rank 0 runs each at once.
    assert [str(op) for op in s.ranks[0][:6]] == [
        "F0:0@s0", "F0:1@s0", "F0:2@s0", "F0:3@s0", "B0:0@s0", "W0:0@s0",
    ]  # fmt: skip
    last = [f"{op.kind}{op.microbatch}" for op in s.ranks[3]]
    assert last[:8] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    assert last[8] == "W0"
    assert last[-4:] == ["W4", "W5", "W6", "W7"]


# ------------------------------------------------------------------------------------ DualPipe


def test_dualpipe_phase_counts_match_the_paper_example():
    # DeepSeek-V3 Figure 5 / the DualPipe README: 8 PP ranks, 20 micro-batches.
    counts = dualpipe_phase_counts(8, 20)
    assert list(counts[0]) == list(DUALPIPE_PHASES)
    assert [counts[0][k] for k in DUALPIPE_PHASES] == [6, 1, 3, 3, 3, 1, 3, 1]
    assert [counts[1][k] for k in DUALPIPE_PHASES] == [4, 2, 2, 4, 2, 2, 2, 2]
    assert [counts[3][k] for k in DUALPIPE_PHASES] == [0, 4, 0, 6, 0, 4, 0, 4]
    # Mirror ranks run the same phases.
    assert all(counts[r] == counts[7 - r] for r in range(8))


def _near_far(rank: int, num_ranks: int) -> tuple[int, int]:
    near = 0 if rank < num_ranks // 2 else 1
    return near, 1 - near


def _kinds(ops, direction=None):
    return collections.Counter(
        op.kind for op in ops if direction is None or op.direction == direction
    )


@pytest.mark.parametrize("p, n", SIZES_DUAL)
def test_dualpipe_ops_per_phase_follow_the_algorithm(p, n):
    counts = dualpipe_phase_counts(p, n)
    phases = dualpipe_phases(p, n)
    for r in range(p):
        c = counts[r]
        h = min(r, p - 1 - r)
        near, far = _near_far(r, p)
        assert [name for name, _ in phases[r]] == list(DUALPIPE_PHASES)
        ph = dict(phases[r])
        pairs = {name: sum(op.overlap_with_next for op in ops) for name, ops in ph.items()}

        k = c["F0"]
        assert _kinds(ph["F0"]) == _kinds(ph["F0"], near) == ({OpKind.F: k} if k else {})

        k = c["F0F1"]
        assert _kinds(ph["F0F1"], near) == {OpKind.F: k}
        assert _kinds(ph["F0F1"], far) == {OpKind.F: k}

        k = c["B1W1F1"]
        assert [op.kind for op in ph["B1W1F1"]] == ["B", "W", "F"] * k
        assert all(op.direction == far for op in ph["B1W1F1"])

        k = c["F0B1F1B0"]
        assert _kinds(ph["F0B1F1B0"], near) == {OpKind.F: k, OpKind.BW: k}
        assert _kinds(ph["F0B1F1B0"], far) == {OpKind.F: k, OpKind.BW: k}
        is_middle = h == p // 2 - 1
        assert pairs["F0B1F1B0"] == 2 * k - is_middle

        k = c["B1F1B0"]
        assert _kinds(ph["B1F1B0"], far) == ({OpKind.F: k, OpKind.BW: k} if k else {})
        assert _kinds(ph["B1F1B0"], near) == ({OpKind.BW: k} if k else {})
        assert pairs["B1F1B0"] == k

        k = c["B1B0"]
        assert [op.direction for op in ph["B1B0"]] == [far, near] * k
        assert all(op.kind in ("B", "BW") for op in ph["B1B0"])
        # The second half of this phase's backwards split off their W: h + 1 of them.
        assert sum(op.kind == "B" for op in ph["B1B0"]) == h + 1
        kinds = [op.kind for op in ph["B1B0"]]
        assert kinds == sorted(kinds, key=lambda kind: kind == "B")

        k = c["WB0"]
        assert [op.kind for op in ph["WB0"]] == ["W", "B"] * k
        assert all(op.direction == near for op in ph["WB0"] if op.kind == "B")

        assert [op.kind for op in ph["W"]] == ["W"] * c["W"]

        # Zero-bubble W's pop the queued split backwards first in first out.
        all_ops = [op for _, ops in phases[r] for op in ops]
        b_order = [(op.direction, op.microbatch) for op in all_ops if op.kind == "B"]
        w_order = [(op.direction, op.microbatch) for op in all_ops if op.kind == "W"]
        assert b_order == w_order


@pytest.mark.parametrize("p, n", SIZES_DUAL)
def test_dualpipe_rank_totals_and_mirror_symmetry(p, n):
    s = dualpipe_schedule(p, n)
    assert (s.name, s.num_directions, s.microbatches_per_direction) == ("DualPipe", 2, n // 2)
    for r, ops in enumerate(s.ranks):
        for d in (0, 1):
            k = _kinds(ops, d)
            assert k[OpKind.F] == n // 2
            assert k[OpKind.B] + k[OpKind.BW] == n // 2
        # Rank PP-1-r runs rank r's program with the two directions swapped.
        mirrored = [dataclasses.replace(op, direction=1 - op.direction) for op in ops]
        assert mirrored == list(s.ranks[p - 1 - r])


def test_dualpipe_first_rank_opening():
    s = dualpipe_schedule(4, 8)
    head = [str(op) + ("&" if op.overlap_with_next else "") for op in s.ranks[0][:10]]
    assert head == [
        "F0:0@s0", "F0:1@s0",  # step 1: 2 forwards of the near direction
        "F0:2@s0", "F1:0@s3",  # step 2: F0 F1
        "B1:0@s3", "W1:0@s3", "F1:1@s3",  # step 3: zero-bubble B1 W F1
        "F0:3@s0&", "BW1:1@s3",  # step 4: F0&B1 ...
        "F1:2@s3&",  # ... F1&B0
    ]  # fmt: skip


# --------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "p, n, match",
    [
        (3, 12, r"num_ranks=3 is invalid for DualPipe: an even integer >= 2"),
        (0, 8, r"num_ranks=0 is invalid for DualPipe"),
        (4.0, 8, r"num_ranks=4.0 is invalid for DualPipe"),
        (
            4,
            6,
            r"num_microbatches=6 is invalid for DualPipe with num_ranks=4: an even integer "
            r">= 2 \* num_ranks = 8",
        ),
        (4, 9, r"num_microbatches=9 is invalid"),
        (8, 14, r"num_microbatches=14 is invalid .* >= 2 \* num_ranks = 16"),
        (4, True, r"num_microbatches=True is invalid"),
    ],
)
def test_dualpipe_rejects_invalid_sizes(p, n, match):
    with pytest.raises(ValueError, match=match):
        dualpipe_schedule(p, n)
    with pytest.raises(ValueError, match=match):
        dualpipe_phase_counts(p, n)


@pytest.mark.parametrize("build", [one_f_one_b_schedule, zb1p_schedule])
@pytest.mark.parametrize(
    "p, n, match",
    [
        (0, 4, r"num_ranks=0 is invalid: an integer >= 1"),
        (4, 0, r"num_microbatches=0 is invalid: an integer >= 1"),
        (2.5, 4, r"num_ranks=2.5 is invalid"),
    ],
)
def test_1d_schedules_reject_invalid_sizes(build, p, n, match):
    with pytest.raises(ValueError, match=match):
        build(p, n)


def test_op_validation():
    assert Op("F", 0, 0, 0).kind is OpKind.F
    with pytest.raises(ValueError, match=r"Op.kind='X' is invalid: one of F, B, W, BW"):
        Op("X", 0, 0, 0)
    with pytest.raises(ValueError, match=r"Op.direction=2 is invalid: 0 or 1"):
        Op("F", 2, 0, 0)
    with pytest.raises(ValueError, match=r"overlap_with_next is only allowed on an F"):
        Op("BW", 0, 0, 0, overlap_with_next=True)
    with pytest.raises(ValueError, match=r"must be >= 0"):
        Op("F", 0, -1, 0)


def _with_rank_ops(schedule: Schedule, rank: int, ops) -> Schedule:
    ranks = list(schedule.ranks)
    ranks[rank] = tuple(ops)
    return dataclasses.replace(schedule, ranks=tuple(ranks))


def test_validate_schedule_catches_broken_schedules():
    s = one_f_one_b_schedule(2, 2)
    ops = list(s.ranks[1])  # F0 BW0 F1 BW1
    with pytest.raises(ValueError, match=r"micro-batch 1 stage 1 ran \['F'\]"):
        validate_schedule(_with_rank_ops(s, 1, ops[:-1]))
    with pytest.raises(ValueError, match=r"rank 1 op 0 \(BW0:0@s1\): runs after \[\]"):
        validate_schedule(_with_rank_ops(s, 1, [ops[1], ops[0]] + ops[2:]))
    with pytest.raises(ValueError, match=r"stage 0 of direction 0 runs on rank 0"):
        validate_schedule(_with_rank_ops(s, 1, [Op("F", 0, 0, 0)] + ops))
    with pytest.raises(ValueError, match=r"must be followed by a B or BW"):
        bad = [dataclasses.replace(ops[0], overlap_with_next=True), ops[2]] + ops[1:2] + ops[3:]
        validate_schedule(_with_rank_ops(s, 1, bad))
    with pytest.raises(ValueError, match=r"out of range"):
        validate_schedule(_with_rank_ops(s, 1, ops + [Op("F", 0, 5, 1)]))
