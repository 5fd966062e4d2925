"""Run metrics: `<run_dir>/metrics.jsonl`, TensorBoard event files, a tqdm bar and a summary.

Each logged step appends one JSON object to metrics.jsonl with (at least) `step`, `loss`,
`main_loss`, `mtp_loss`, the balance losses in use, `lr`, `grad_norm`, `tokens_per_s`, `mfu`,
`skipped`, and per MoE layer (MTP layers last) `expert_load_max` / `expert_load_min` (the busiest
and idlest expert's token count over the mean count) and `dropped` (fraction of token-expert
assignments dropped; 0 for the dropless path), plus their means over layers, and
`expert_load` ([L][E] nested lists: each expert's share of its layer's assignments; TensorBoard
gets it as one histogram per layer). `tokens_per_s`
counts the real (non-padding, `loss_mask`) tokens over the steps since the last log line,
excluding the first step of an invocation (compilation); where padding made them differ,
`positions_per_s` counts all B x T positions as well (`token_rates`). A resumed run appends
to the same file, so a step may appear more than once; the last occurrence is the one that counts.
Non-finite values (the loss of a skipped step) are written as null, keeping every line JSON.

Only process 0 writes; the other processes' loggers are inert.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

_BAR_KEYS = ("loss", "tokens_per_s")
_LAYER_KEYS = ("expert_load_max", "expert_load_min", "dropped")


def real_tokens(batch: dict[str, Any], scale: int = 1) -> tuple[float, float]:
    """(non-padding tokens, positions) of a host batch (real = its `loss_mask`) x scale.

    `scale`: hosts whose batches make up the global one (each host counts only its rows).
    """
    positions = float(np.asarray(batch["input_ids"]).size)
    mask = batch.get("loss_mask")
    n = positions if mask is None else float(np.asarray(mask).sum())
    return n * scale, positions * scale


def token_rates(real_tokens: float, positions: float, seconds: float) -> dict[str, float]:
    """Throughput of `positions` B x T positions holding `real_tokens` non-padding tokens.

    Returns `tokens_per_s` (real tokens) and, only where padding makes it differ,
    `positions_per_s` (all positions, what the hardware processed).
    """
    out = {"tokens_per_s": real_tokens / seconds}
    if real_tokens != positions:
        out["positions_per_s"] = positions / seconds
    return out


def to_python(metrics: dict[str, Any]) -> dict[str, Any]:
    """Host values of a metrics dict: floats for scalars, (nested) lists for arrays."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            out[key] = int(arr) if arr.dtype.kind in "iu" else float(arr)
        else:
            out[key] = arr.astype(np.float64).tolist()  # [L] or [L, E]
    for key in _LAYER_KEYS:
        if isinstance(out.get(key), list) and out[key]:
            out[f"{key}_mean"] = float(np.mean(out[key]))
    return out


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and +-inf (a skipped step's loss) as null: bare NaN is not JSON."""

    def one(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return [one(x) for x in v] if isinstance(v, list) else v

    return {k: one(v) for k, v in record.items()}


def _summary_writer(logdir: str):
    """tensorboardX's `SummaryWriter`, imported without PyTorch.

    tensorboardX's writer module tries `import torch` only to accept torch tensors as values;
    with torch installed (the test extra) that import costs every training process ~1.2 s and
    ~190 MB of memory for nothing (we log Python floats and numpy arrays). Where neither is
    loaded yet, `sys.modules["torch"] = None` makes that one import fail as if torch were
    absent (tensorboardX catches the ImportError); the entry is removed right after, so the
    process can still import torch itself.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


class MetricsLogger:
    """Writes metrics for steps [start_step, total_steps] of a run.

    Args:
      run_dir: output folder (created).
      total_steps: the run's last step (progress bar length and ETA).
      start_step: first step of this invocation (> 0 on resume).
      enabled: False on processes other than 0.
      tensorboard: write event files to <run_dir>/tb.
      progress: show the tqdm bar.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.run_dir = run_dir
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.history: list[dict[str, Any]] = []
        self._start = time.time()
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115
        if tensorboard:
            self._tb = _summary_writer(os.path.join(run_dir, "tb"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step` (no device sync needed)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Records one step's metrics (device arrays or Python values); returns the record."""
        record = {"step": int(step), **to_python(metrics)}
        self.history.append(record)
        if not self.enabled:
            return record
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list) and value and isinstance(value[0], list):
                    for i, row in enumerate(value):  # [L, E]: the spread over experts
                        self._tb.add_histogram(f"moe/{key}/layer_{i}", np.asarray(row), step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"moe/{key}/layer_{i}", v, step)
                elif value is not None and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}"
            )
        return record

    def summary(self) -> dict[str, Any]:
        """Short end-of-run numbers (first/last/best loss, throughput, MFU, skipped steps)."""
        h = [r for r in self.history if "loss" in r]
        out: dict[str, Any] = {"run_dir": self.run_dir, "wall_s": time.time() - self._start}
        if h:
            rates = [r["tokens_per_s"] for r in h if r.get("tokens_per_s")]
            mfus = [r["mfu"] for r in h if r.get("mfu") is not None]
            out.update(
                steps=h[-1]["step"],
                first_loss=h[0]["loss"],
                last_loss=h[-1]["loss"],
                best_loss=min(r["loss"] for r in h),
                tokens_per_s=float(np.mean(rates)) if rates else None,
                mfu=float(np.mean(mfus)) if mfus else None,
                skipped=h[-1].get("skipped", 0),
            )
        return out

    def close(self) -> dict[str, Any]:
        """Closes files and the bar, prints and returns the summary."""
        summary = self.summary()
        if not self.enabled:
            return summary
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        lines = [f"run finished: {summary['run_dir']} ({summary['wall_s']:.0f} s)"]
        if "steps" in summary:
            lines.append(
                f"  step {summary['steps']}: loss {summary['first_loss']:.4f} -> "
                f"{summary['last_loss']:.4f} (best {summary['best_loss']:.4f}), "
                f"skipped {summary['skipped']}"
            )
            if summary["tokens_per_s"]:
                mfu = summary["mfu"]
                mfu_text = f"{100 * mfu:.2f}%" if mfu is not None else "n/a"
                lines.append(f"  {summary['tokens_per_s']:.0f} tokens/s, MFU {mfu_text}")
        print("\n".join(lines), file=sys.stderr)
        return summary
