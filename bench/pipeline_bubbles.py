"""Pipeline bubbles of 1F1B, ZB1P and DualPipe: simulation next to DeepSeek-V3's Table 2.

Prints, for PP = 4, 8, 16, a markdown table per cost regime with the simulated bubble of the
worst rank, the report's formula, the peak activations per rank and the parameter copies, and
optionally draws the per-rank timelines (PNG with matplotlib when it is installed, otherwise a
hand-written SVG).

    python bench/pipeline_bubbles.py
    python bench/pipeline_bubbles.py --f 1 --b 2 --w 1 --fb 2.5
    python bench/pipeline_bubbles.py --timeline timeline.svg --timeline-pp 8 --timeline-n 20
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import pathlib
import sys

from deepseek_jax.report import OP_COLORS, plot_pipeline_timeline, pyplot, timeline_boxes
from deepseek_jax.sharding.pipeline_sim import (
    Costs,
    report_activations,
    report_bubble,
    report_parameters,
    simulate,
)
from deepseek_jax.sharding.schedules import (
    OpKind,
    Schedule,
    dualpipe_schedule,
    one_f_one_b_schedule,
    zb1p_schedule,
)

BUILDERS = {"1F1B": one_f_one_b_schedule, "ZB1P": zb1p_schedule, "DualPipe": dualpipe_schedule}

# Default regimes: the zero-bubble paper's T_F = T_B = T_W (where every Table 2 formula holds),
# the same with a cheaper overlapped F&B slot, and F = B = 2, W = 1 (where DualPipe's does not).
DEFAULT_REGIMES = (Costs(1, 2, 1), Costs(1, 2, 1, fb=2.5), Costs(2, 2, 1))


def _fmt(x: float) -> str:
    return f"{x:g}"


def bubble_table(costs: Costs, pps=(4, 8, 16), microbatches_per_rank: int = 4) -> str:
    """Markdown table of simulated vs. Table 2 bubbles and memory for one cost regime."""
    lines = [
        f"Costs: F={_fmt(costs.f)}, B={_fmt(costs.b)} (full backward), W={_fmt(costs.w)}, "
        f"F&B={_fmt(costs.overlapped)}; N = {microbatches_per_rank} x PP micro-batches.",
        "",
        "| Method | PP | Bubble (sim, worst rank) | Table 2 bubble | Exact | Bubble / busy "
        "| Activations (sim) | Table 2 activations | Stages per rank | Table 2 parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pp in pps:
        for method, build in BUILDERS.items():
            schedule = build(pp, microbatches_per_rank * pp)
            result = simulate(schedule, costs)
            stages = max(len({op.stage for op in ops}) for ops in schedule.ranks)
            formula = report_bubble(method, pp, costs)
            worst = max(range(pp), key=lambda r: result.bubble[r])
            exact = "yes" if abs(result.bubble[worst] - formula) < 1e-9 else "no"
            lines.append(
                f"| {method} | {pp} | {_fmt(result.bubble[worst])} | {_fmt(formula)} | {exact} "
                f"| {result.bubble[worst] / result.busy[worst]:.3f} "
                f"| {result.max_peak_activations} | {report_activations(method, pp)} "
                f"| {stages} | {report_parameters(method)}x |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- timelines

_COLORS = OP_COLORS
_boxes = timeline_boxes


def _panels(schedules: list[Schedule], costs: Costs):
    return [
        (f"{s.name}, PP={s.num_ranks}, N={s.num_microbatches}", s, simulate(s, costs))
        for s in schedules
    ]


def write_svg(path: pathlib.Path, schedules: list[Schedule], costs: Costs) -> None:
    """Draws per-rank timelines as SVG; overlapped F&B pairs get a black border."""
    panels = _panels(schedules, costs)
    span = max(r.makespan for _, _, r in panels)
    scale, row, left, top = 900.0 / span, 22.0, 60.0, 30.0
    parts, y = [], 10.0
    for title, _, result in panels:
        parts.append(
            f'<text x="{left}" y="{y + 14}" font-size="14">{html.escape(title)}, '
            f"makespan {_fmt(result.makespan)}</text>"
        )
        y += top
        for r, tl in enumerate(result.timeline):
            parts.append(f'<text x="4" y="{y + row * 0.7}" font-size="11">rank {r}</text>')
            for start, end, op, y0, y1 in _boxes(tl):
                x, w = left + start * scale, (end - start) * scale
                h = (y1 - y0) * (row - 2)
                parts.append(
                    f'<rect x="{x:.2f}" y="{y + y0 * (row - 2):.2f}" width="{w:.2f}" '
                    f'height="{h:.2f}" fill="{_COLORS[(op.kind, op.direction)]}" '
                    f'stroke="white" stroke-width="0.5"><title>{html.escape(str(op))}</title>'
                    "</rect>"
                )
                if w > 9 and h > 9:
                    parts.append(
                        f'<text x="{x + w / 2:.2f}" y="{y + (y0 + y1) / 2 * row + 3:.2f}" '
                        f'font-size="8" text-anchor="middle">{op.microbatch}</text>'
                    )
                if op.overlap_with_next:
                    parts.append(
                        f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" '
                        f'height="{row - 2}" fill="none" stroke="black" />'
                    )
            y += row
        y += 10
    legend = " ".join(f"{k}{d}" for k, d in _COLORS)
    parts.append(
        f'<text x="{left}" y="{y + 12}" font-size="11">colours: {legend} '
        "(kind, direction); numbers are micro-batches</text>"
    )
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + 920}" height="{y + 24}">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n'
    )


def ascii_timeline(schedule: Schedule, costs: Costs, chars_per_unit: int = 2) -> str:
    """One text line per rank; upper case is direction 0, lower case direction 1, X/x a full
    backward, `a&b` an overlapped pair, `.` idle, and the digits the micro-batch."""
    result = simulate(schedule, costs)
    width = round(result.makespan * chars_per_unit)
    lines = []
    for r, tl in enumerate(result.timeline):
        cells = ["."] * width
        i = 0
        while i < len(tl):
            start, end, op = tl[i]
            n = 2 if op.overlap_with_next else 1
            label = "&".join(_letter(o) + str(o.microbatch) for _, _, o in tl[i : i + n])
            a, b = round(start * chars_per_unit), round(end * chars_per_unit)
            cells[a:b] = list((label + "|")[: b - a].rjust(b - a, "-")) if b - a else []
            i += n
        lines.append(f"rank {r:2d} {''.join(cells)}")
    return "\n".join(lines)


def _letter(op) -> str:
    letter = "X" if op.kind == OpKind.BW else str(op.kind)
    return letter if op.direction == 0 else letter.lower()


def write_png(path: pathlib.Path, schedules: list[Schedule], costs: Costs) -> None:
    """Draws per-rank timelines with matplotlib (deepseek_jax.report)."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(schedules),
        1,
        figsize=(14, 2 + 0.35 * sum(s.num_ranks for s in schedules)),
        squeeze=False,
    )
    for ax, schedule in zip(axes[:, 0], schedules, strict=True):
        plot_pipeline_timeline(ax, schedule, costs)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_timeline(path: pathlib.Path, pp: int, n: int, costs: Costs) -> pathlib.Path:
    """Writes the timelines of all three schedules; returns the file actually written."""
    schedules = [build(pp, n) for build in BUILDERS.values()]
    if path.suffix == ".png" and importlib.util.find_spec("matplotlib") is not None:
        write_png(path, schedules, costs)
        return path
    svg = path.with_suffix(".svg")
    write_svg(svg, schedules, costs)
    return svg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--f", type=float, help="forward chunk time F")
    parser.add_argument("--b", type=float, help="full backward chunk time B")
    parser.add_argument("--w", type=float, help="weight-gradient chunk time W")
    parser.add_argument("--fb", type=float, default=None, help="overlapped F&B time (F+B)")
    parser.add_argument(
        "--microbatches-per-rank",
        type=int,
        default=4,
        help="N / PP for the table (>= 2 for DualPipe)",
    )
    parser.add_argument("--timeline", type=pathlib.Path, help="write timelines here (.png/.svg)")
    parser.add_argument("--timeline-pp", type=int, default=8)
    parser.add_argument("--timeline-n", type=int, default=20)
    parser.add_argument("--ascii", action="store_true", help="print text timelines too")
    args = parser.parse_args(argv)

    given = [v is not None for v in (args.f, args.b, args.w)]
    if any(given) and not all(given):
        parser.error("--f, --b and --w go together")
    regimes = [Costs(args.f, args.b, args.w, args.fb)] if all(given) else DEFAULT_REGIMES
    for costs in regimes:
        print(bubble_table(costs, microbatches_per_rank=args.microbatches_per_rank))
        print()
    if args.ascii:
        for build in BUILDERS.values():
            schedule = build(args.timeline_pp, args.timeline_n)
            print(f"{schedule.name}, PP={schedule.num_ranks}, N={schedule.num_microbatches}:")
            print(ascii_timeline(schedule, regimes[0]))
            print()
    if args.timeline is not None:
        written = write_timeline(args.timeline, args.timeline_pp, args.timeline_n, regimes[0])
        print(f"timeline written to {written}", file=sys.stderr)


if __name__ == "__main__":
    main()
