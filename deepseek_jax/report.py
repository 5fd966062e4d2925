"""The look of a run: matplotlib plots of metrics.jsonl, pipeline timelines and cache sizes.

    python -m deepseek_jax.report runs/NAME                  # writes runs/NAME/report.png
    python -m deepseek_jax.report runs/NAME --out run.html   # one page, PNG embedded

The one-page summary has one panel per series: losses (total, main, MTP, balance), learning
rate, gradient norm, throughput (tokens/s), dropped fraction per MoE layer, the busiest expert's
load over the mean per layer, and one heatmap per MoE layer of each expert's share of its
layer's (token, expert) assignments over the steps (`expert_load`, logged by the train loop):
aux-loss-free bias balancing shows as the heatmap evening out. Every plot function draws into a
given Axes and returns the names of the series it drew, so notebooks and tests can check them.

matplotlib is an optional dependency: `pip install "deepseek-jax[plot]"`.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepseek_jax.sharding.pipeline_sim import Costs, SimResult, TimelineEntry, simulate
from deepseek_jax.sharding.schedules import OpKind, Schedule

_LOSS_KEYS = ("loss", "main_loss", "mtp_loss", "seq_balance_loss", "expert_balance_loss")
# (kind, direction) -> colour of a pipeline op; upper/lower case letters in text timelines.
OP_COLORS = {
    (OpKind.F, 0): "#8ecae6",
    (OpKind.F, 1): "#ffb703",
    (OpKind.B, 0): "#219ebc",
    (OpKind.B, 1): "#fb8500",
    (OpKind.BW, 0): "#126782",
    (OpKind.BW, 1): "#c65d00",
    (OpKind.W, 0): "#b5a6d6",
    (OpKind.W, 1): "#8f7bbf",
}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend unless a notebook chose one."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            'plotting needs matplotlib: pip install "deepseek-jax[plot]" (or matplotlib)'
        ) from e
    if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged records of a run, one per step in step order (a resumed run's repeat wins).

    Args:
      path: a run folder holding metrics.jsonl, or the metrics.jsonl file itself.
    Raises:
      FileNotFoundError: no such folder or no metrics.jsonl in it.
      ValueError: the file is empty or a line is not JSON (the message names file and line).
    """
    path = os.fspath(path)
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = "run folder" if os.path.isdir(path) else "path"
        raise FileNotFoundError(
            f"no metrics file {file}: the {where} {path!r} has no metrics.jsonl (train.run_dir "
            "of a run of train_main.py, e.g. runs/v3-small)"
        )
    by_step: dict[int, dict[str, Any]] = {}
    with open(file) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}, line {i}: not a JSON record ({e})") from e
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{file}, line {i}: a record needs a 'step' field")
            by_step[int(record["step"])] = record
    if not by_step:
        raise ValueError(f"{file} holds no records (the run logged no step yet)")
    return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar key over the records that have it (null -> NaN)."""
    rows = [(r["step"], r[key]) for r in records if key in r]
    steps = np.array([s for s, _ in rows], dtype=np.int64)
    values = np.array([np.nan if v is None else v for _, v in rows], dtype=np.float64)
    return steps, values


def layer_series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [S, L] or [S, L, E]) of a per-layer key (`dropped`, `expert_load`)."""
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list)]
    steps = np.array([s for s, _ in rows], dtype=np.int64)
    values = np.array([[np.nan if v is None else v for v in _flat(x)] for _, x in rows])
    if rows and isinstance(rows[0][1][0], list):
        values = values.reshape(len(rows), len(rows[0][1]), -1)
    return steps, values


def _flat(x: list) -> list:
    return [v for row in x for v in row] if x and isinstance(x[0], list) else x


# ----------------------------------------------------------------------------- run panels


def _line(ax, records, keys, *, title, ylabel=None, logy=False) -> list[str]:
    drawn = []
    for key in keys:
        steps, values = series(records, key)
        if len(steps) and np.isfinite(values).any():
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
            drawn.append(key)
    ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy and drawn:
        ax.set_yscale("log")
    if len(drawn) > 1:
        ax.legend(fontsize=7)
    return drawn


def plot_losses(ax, records) -> list[str]:
    """Total, main, MTP and balance losses (whichever the run logged)."""
    return _line(ax, records, _LOSS_KEYS, title="losses", logy=False)


def plot_lr(ax, records) -> list[str]:
    return _line(ax, records, ["lr"], title="learning rate")


def plot_grad_norm(ax, records) -> list[str]:
    return _line(ax, records, ["grad_norm"], title="gradient norm (before clipping)")


def plot_throughput(ax, records) -> list[str]:
    """tokens/s (non-padding) and, where padding made it differ, positions/s."""
    return _line(ax, records, ["tokens_per_s", "positions_per_s"], title="throughput (tokens/s)")


def _per_layer(ax, records, key, title) -> list[str]:
    steps, values = layer_series(records, key)
    drawn = []
    if len(steps):
        for i in range(values.shape[1]):
            ax.plot(steps, values[:, i], label=f"{key}/layer_{i}")
            drawn.append(f"{key}/layer_{i}")
    ax.set_title(title)
    ax.set_xlabel("step")
    if 1 < len(drawn) <= 8:
        ax.legend(fontsize=6)
    return drawn


def plot_dropped(ax, records) -> list[str]:
    """Fraction of (token, expert) assignments dropped, per MoE layer (0 when dropless)."""
    return _per_layer(ax, records, "dropped", "dropped fraction per MoE layer")


def plot_load_imbalance(ax, records) -> list[str]:
    """Busiest expert's load over the mean, per MoE layer (1 = perfectly balanced)."""
    return _per_layer(ax, records, "expert_load_max", "busiest expert / mean load")


def plot_expert_load(ax, records, layer: int) -> list[str]:
    """Heatmap of each expert's share of MoE layer `layer`'s assignments (experts x steps).

    Layers count the model's MoE layers in order, the MTP blocks last.
    """
    steps, load = layer_series(records, "expert_load")
    if not len(steps):
        ax.set_title(f"expert load, layer {layer}: not logged")
        return []
    if not 0 <= layer < load.shape[1]:
        raise ValueError(f"layer={layer} out of range: the run logged {load.shape[1]} MoE layers")
    E = load.shape[2]
    image = ax.imshow(
        load[:, layer].T,  # [E, S]
        aspect="auto",
        origin="lower",
        cmap="viridis",
        vmin=0.0,
        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5),
        interpolation="nearest",
    )
    ax.figure.colorbar(image, ax=ax, fraction=0.05, label="share (uniform = 1/E)")
    ax.set_title(f"expert load, MoE layer {layer} (uniform {1 / E:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    return [f"expert_load/layer_{layer}"]


def _heatmap_layers(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def run_figure(records: Sequence[dict[str, Any]], *, title: str = "", max_heatmaps: int = 6):
    """The one-page summary figure of a run.

    Returns:
      (figure, contents): contents maps each panel's title to the series drawn in it.
    """
    plt = pyplot()
    n_layers = 0
    steps, load = layer_series(records, "expert_load")
    if len(steps):
        n_layers = load.shape[1]
    heat = _heatmap_layers(n_layers, max_heatmaps)
    rows = 3 + math.ceil(len(heat) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.2 * rows), squeeze=False)
    panels = [plot_losses, plot_lr, plot_grad_norm, plot_throughput, plot_dropped]
    panels.append(plot_load_imbalance)
    contents: dict[str, list[str]] = {}
    flat = list(axes.reshape(-1))
    for ax, fn in zip(flat, panels, strict=False):
        contents[fn.__name__.removeprefix("plot_")] = fn(ax, records)
    for ax, layer in zip(flat[len(panels) :], heat, strict=False):
        contents[f"expert_load_layer_{layer}"] = plot_expert_load(ax, records, layer)
    for ax in flat[len(panels) + len(heat) :]:
        ax.axis("off")
    last = records[-1]
    head = f"{title}  step {last['step']}"
    if last.get("loss") is not None:
        head += f", loss {last['loss']:.4f}"
    fig.suptitle(head.strip())
    fig.tight_layout()
    return fig, contents


def _summary_rows(records) -> list[tuple[str, str]]:
    first, last = records[0], records[-1]
    rows = [("steps logged", f"{len(records)} (last step {last['step']})")]
    for key in ("loss", "main_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        if last.get(key) is not None:
            start = first.get(key)
            text = f"{last[key]:.4g}" + (f" (first {start:.4g})" if start is not None else "")
            rows.append((key, text))
    for key in ("dropped_mean", "expert_load_max_mean"):
        if last.get(key) is not None:
            rows.append((key, f"{last[key]:.4g}"))
    return rows


def write_report(
    run: str | os.PathLike, out: str | os.PathLike | None = None
) -> tuple[str, dict[str, list[str]]]:
    """Writes the one-page summary of the run in `run` (folder or metrics.jsonl).

    Args:
      run: the run folder (or its metrics.jsonl).
      out: .png or .html file; default <run folder>/report.png.
    Returns:
      (path written, contents of the figure: panel title -> series names).
    """
    records = read_metrics(run)
    run = os.fspath(run)
    folder = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    out = os.fspath(out) if out is not None else os.path.join(folder, "report.png")
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".png", ".html"):
        raise ValueError(f"out={out!r}: the report is written as .png or .html")
    name = os.path.basename(os.path.abspath(folder))
    fig, contents = run_figure(records, title=name)
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if ext == ".png":
        fig.savefig(out, dpi=100)
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        table = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in _summary_rows(records)
        )
        image = base64.b64encode(buf.getvalue()).decode()
        with open(out, "w") as f:
            f.write(
                f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}"
                f"</title></head><body><h1>run {html.escape(name)}</h1><table>{table}</table>"
                f"<img alt='run summary' src='data:image/png;base64,{image}'></body></html>\n"
            )
    plt.close(fig)
    return out, contents


# --------------------------------------------------------------------------- pipeline timelines


def timeline_boxes(tl: Sequence[TimelineEntry]):
    """(start, end, op, y0, y1) per op in row-height fractions; an overlapped F&B pair splits
    its slot into a top and a bottom half."""
    boxes, i = [], 0
    while i < len(tl):
        start, end, op = tl[i]
        if op.overlap_with_next:
            boxes += [(start, end, op, 0.0, 0.5), (*tl[i + 1], 0.5, 1.0)]
            i += 2
        else:
            boxes.append((start, end, op, 0.0, 1.0))
            i += 1
    return boxes


def plot_pipeline_timeline(
    ax, schedule: Schedule, costs: Costs, *, legend: bool = False
) -> SimResult:
    """Draws the simulated per-rank timeline of `schedule` (one row per rank); returns the
    simulation. Overlapped F&B pairs get a black border; colours are OP_COLORS (`legend` adds
    a key of them outside the axes)."""
    result = simulate(schedule, costs)
    for r, tl in enumerate(result.timeline):
        for start, end, op, y0, y1 in timeline_boxes(tl):
            ax.broken_barh(
                [(start, end - start)],
                (r + y0 * 0.9, (y1 - y0) * 0.9),
                facecolors=OP_COLORS[(op.kind, op.direction)],
                edgecolors="black" if op.overlap_with_next else "white",
            )
    ax.set_yticks(
        [r + 0.45 for r in range(schedule.num_ranks)],
        [f"rank {r}" for r in range(schedule.num_ranks)],
    )
    ax.set_ylim(schedule.num_ranks, 0)
    ax.set_xlim(0, result.makespan)
    ax.set_title(
        f"{schedule.name}, PP={schedule.num_ranks}, N={schedule.num_microbatches}: makespan "
        f"{result.makespan:g}, worst bubble {result.max_bubble:g}"
    )
    if legend:
        from matplotlib.patches import Patch

        used = {(op.kind, op.direction) for tl in result.timeline for _, _, op in tl}
        handles = [
            Patch(color=c, label=f"{k} dir {d}")
            for (k, d), c in OP_COLORS.items()
            if (k, d) in used
        ]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return result


# ------------------------------------------------------------------------------------- caches


def plot_cache_bytes(ax, context_lengths: Sequence[int], curves: dict[str, Sequence[float]]):
    """Cache bytes per sequence against context length, one log-log line per cache kind."""
    for name, values in curves.items():
        ax.plot(context_lengths, np.asarray(values) / 2**30, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache GiB per sequence")
    ax.set_title("KV cache size per sequence")
    ax.legend(fontsize=8)
    return list(curves)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_jax.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", help="run folder (train.run_dir, e.g. runs/v3-small)")
    parser.add_argument("--out", help="output .png or .html (default RUN/report.png)")
    args = parser.parse_args(argv)
    try:
        path, contents = write_report(args.run, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report written to {path} ({sum(map(len, contents.values()))} series)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
