"""What may change when a run resumes: the stored run config against the new one.

Every checkpoint stores the resolved run config (`RunConfig.to_dict()`). On resume the loop
compares it with the new config, field by field:

* **safe** changes are logged and accepted: the run's length and learning-rate schedule, logging,
  checkpointing, launch and layout settings (`SAFE`). Orbax restores the arrays into the new
  mesh's shardings, so mesh and pipeline layout may change.
* every other change **breaks** the run and is refused, listed field by field: the model (shapes,
  routing, dtypes), the loss, the data pipeline (files, tokenizer, sequence length, batch size,
  shuffling, prefetching: grain's iterator state only fits the pipeline that wrote it) and the
  optimizer's state layout. `--allow-config-change` (`allow=True`) accepts them anyway.

A field the stored config lacks was added to the code after the run was written; it reads as
its default, since a field is added with the default that keeps what runs did before it existed
(e.g. `model.scan_layers: true`, layers scanned as they always had been).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import traverse_util

# section.field names (or whole sections ending in ".") whose change cannot break a resumed run.
SAFE = (
    "train.steps",
    "train.lr",
    "train.schedule",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.decay_start",
    "train.decay_end",
    "train.step_boundaries",
    "train.step_factors",
    "train.weight_decay",
    "train.clip_norm",
    "train.grad_accum",
    "train.bias_update_speed",
    "train.bias_update_stop_tokens",
    "train.mtp_lambda_late",
    "train.mtp_lambda_switch_tokens",
    "train.seed",
    "train.log_every",
    "train.run_dir",
    "train.name",
    "train.progress",
    "train.tensorboard",
    "train.peak_flops",
    "train.max_consecutive_skips",
    "train.host_malloc",
    "data.read_threads",
    "data.max_bad_records",
    "checkpoint.",
    "dist.",
    "mesh.",
    "pipeline.",
)


class ConfigChangeError(ValueError):
    """The new run config changes fields that the checkpoint's run cannot continue with."""


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def field_defaults() -> dict[str, Any]:
    """section.field -> its dataclass default, for every run-config field that has one."""
    from deepseek_jax.train.config import SECTIONS

    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f"{section}.{f.name}"] = _norm(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out[f"{section}.{f.name}"] = _norm(f.default_factory())
    return out


def diff_configs(
    old: dict[str, Any], new: dict[str, Any]
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(breaking, safe) changes between two `RunConfig.to_dict()` trees, as (key, old, new); a
    field missing from `old` reads as its default (`field_defaults`)."""
    a, b = (traverse_util.flatten_dict(t, sep=".") for t in (old, new))
    missing = object()
    defaults = field_defaults()
    breaking, safe = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = _norm(a.get(key, defaults.get(key, missing))), _norm(b.get(key, missing))
        if va == vb:
            continue
        change = (key, None if va is missing else va, None if vb is missing else vb)
        (safe if _is_safe(key) else breaking).append(change)
    return breaking, safe


def _lines(changes: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in changes)


def check_resume(
    old: dict[str, Any], new: dict[str, Any], *, step: int, where: str, allow: bool = False
) -> list[str]:
    """Compares the config stored at `step` with the new one.

    Args:
      old, new: `RunConfig.to_dict()` of the checkpoint and of this invocation.
      step, where: the checkpoint's step and folder (for messages).
      allow: accept breaking changes (`--allow-config-change`).
    Returns:
      Lines to log: the safe changes, and the breaking ones when allowed.
    Raises:
      ConfigChangeError: breaking changes and not `allow`; the message lists each field.
    """
    breaking, safe = diff_configs(old, new)
    if breaking and not allow:
        raise ConfigChangeError(
            f"cannot resume from step {step} of {where}: the run config changed in ways the "
            f"checkpointed run cannot continue with:\n{_lines(breaking)}\n"
            "Restore those values, start a new run (another train.run_dir / checkpoint.dir), "
            "or pass --allow-config-change to resume anyway."
        )
    out = []
    if safe:
        out.append(f"resuming with changed settings (safe):\n{_lines(safe)}")
    if breaking:
        out.append(f"resuming with BREAKING changes (--allow-config-change):\n{_lines(breaking)}")
    return out
