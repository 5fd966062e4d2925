"""Run configuration: `TrainConfig`, `CheckpointConfig`, `DistConfig` and the `RunConfig` bundle.

A run config is a YAML file with one mapping per section (`model`, `loss`, `data`, `mesh`,
`train`, `checkpoint`, `dist`), each holding fields of that section's dataclass; `model` may also
name a preset (`preset: v3-small`) whose fields the other keys override. Command-line overrides
are `section.field=value` (`train.steps=100 model.num_hidden_layers=2 mesh.fsdp=8`); values are
parsed as YAML scalars and then converted to the field's type. Unknown sections or fields, and
values of the wrong type, are errors that name the key before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

from deepseek_jax.config import PRESET_DIR, ModelConfig
from deepseek_jax.data import DataConfig
from deepseek_jax.losses import LossConfig
from deepseek_jax.sharding.mesh import MeshConfig
from deepseek_jax.sharding.pipeline import PipelineConfig
from deepseek_jax.train.post_config import TASKS, PostConfig

Schedule = Literal["v3", "multistep", "cosine", "constant"]
Task = Literal["pretrain", "sft", "dpo", "grpo"]
DataLayout = Literal["per_host", "global"]
DEFAULT_RUN_CONFIG = os.path.join(PRESET_DIR, "train-v3-small.yaml")


def _fail(cls: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{field}={value!r} is invalid: {allowed}")


def _check_finite(obj: Any) -> None:
    """NaN passes every `x <= 0` test and inf most others: reject both by field name."""
    for f in dataclasses.fields(obj):
        values = getattr(obj, f.name)
        for value in values if isinstance(values, tuple) else (values,):
            if isinstance(value, float) and not math.isfinite(value):
                _fail(type(obj).__name__, f.name, getattr(obj, f.name), "must be finite")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Defaults are DeepSeek-V3's (technical report, Sec. 4.2).

    Attributes:
      task: the objective: "pretrain" (next-token + MTP + balance losses on `data`), "sft",
        "dpo" or "grpo" (post-training on the chat JSONL of `post.data`, see PostConfig).
      init_from: start from these weights instead of a random initialisation: a hub checkpoint
        folder, an Orbax checkpoint of `python -m deepseek_jax.convert` or a `train_main.py` run
        folder (its newest checkpoint); the model config is the checkpoint's. With
        trainable="mtp" the model config is this run's instead and only the arrays the checkpoint
        has are loaded (MTP modules it lacks start from their initialisation). Ignored when the
        run resumes from its own checkpoint.
      steps: optimizer steps of the run (the schedule's length).
      lr: peak learning rate.
      schedule: "v3" (warm-up, constant, cosine to min_lr, constant), "multistep" (DeepSeek LLM:
        warm-up, x step_factors[i] after step_boundaries[i] of the steps), "cosine" (warm-up then
        cosine to min_lr over the remaining steps) or "constant" (warm-up then constant).
      warmup_steps: linear warm-up length.
      min_lr_ratio: final learning rate as a fraction of `lr` ("v3" and "cosine").
      decay_start, decay_end: fractions of the run's tokens where the "v3" cosine starts and
        ends (V3: constant until 10T of 14.8T tokens, cosine until 14.3T), used where
        decay_start_tokens / decay_end_tokens are null.
      decay_start_tokens, decay_end_tokens: the same boundaries in tokens (V3: 10T, 14.3T).
      final_lr, final_lr_tokens: the "v3" schedule's last stage, final_lr from this many tokens
        on (V3: 7.3e-6 for the last 167B tokens, from 14.633T); null = none.
      step_boundaries, step_factors: the "multistep" drops (DeepSeek LLM: x0.316 at 80%, x0.1
        at 90% of the steps).
      b1, b2, eps, weight_decay: AdamW; norms and biases get no decay.
      clip_norm: global gradient-norm clip (0 disables it).
      grad_accum: micro-batches per step; the global batch must divide by it.
      mu_dtype: dtype of Adam's first moment ("float32" or "bfloat16").
      bias_update_speed: gamma of the aux-loss-free bias update b += gamma * sign(mean - load).
      bias_update_stop_tokens: gamma becomes 0 after this many tokens (V3: the last 500B); None
        never stops.
      mtp_lambda_late, mtp_lambda_switch_tokens: the MTP weight switches from
        LossConfig.mtp_lambda to mtp_lambda_late after this many tokens (V3: 0.3 -> 0.1 after
        10T); None keeps LossConfig.mtp_lambda.
      seed: parameter initialisation seed (the data has its own, DataConfig.seed).
      data_layout: "per_host" (each host reads its own documents, scalable) or "global" (every
        host builds the global batch and keeps its rows, so batches do not depend on the number
        of processes; small corpora and reproducibility tests).
      log_every: steps between metric lines.
      run_dir: output folder; None = runs/<name or a timestamp>.
      name: run name used for the default run_dir.
      progress: show a tqdm progress bar.
      tensorboard: write TensorBoard event files to <run_dir>/tb.
      peak_flops: peak FLOP/s of one device for MFU; None = the table in flops.py.
      scaling_compute: a compute budget C (FLOPs); when set, `load_run_config` replaces lr,
        steps and data.global_batch_size with DeepSeek LLM's scaling laws (deepseek_jax.scaling:
        eta_opt(C), B_opt(C) / seq_len rows, (C / M) / tokens per step).
      max_consecutive_skips: stop the run with an error after this many consecutive steps were
        skipped for a non-finite loss, gradient or update (the last good checkpoint is kept;
        0 = never stop).
      trainable: "all", or "mtp" to train only the MTP modules on a frozen main model (every
        other parameter gets a zero update; train/trainable.py). Needs bias_update_speed 0, so
        that the main model's routing biases stay as they are too.
      host_malloc: "auto" (reuse freed host memory when JAX runs on CPU), "reuse" or "system".
        "reuse" keeps XLA:CPU's per-step block of temporaries in the process instead of glibc
        mapping it afresh (and page-faulting it in) every step: 1.2x faster CPU training, at
        the price of keeping the peak host memory and ~1.4x slower compiles
        (deepseek_jax/host_memory.py); "system" leaves malloc as it is. Takes effect only when
        set before JAX's backends start, as train_main.py does ("reuse" is then an error;
        "auto" leaves it).
    """

    task: Task = "pretrain"
    init_from: str | None = None
    steps: int = 10000
    lr: float = 2.2e-4
    schedule: Schedule = "v3"
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    decay_start: float = 10.0 / 14.8
    decay_end: float = 14.3 / 14.8
    decay_start_tokens: float | None = None
    decay_end_tokens: float | None = None
    final_lr: float | None = None
    final_lr_tokens: float | None = None
    step_boundaries: tuple[float, ...] = (0.8, 0.9)
    step_factors: tuple[float, ...] = (0.316, 0.1)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1
    mu_dtype: Literal["float32", "bfloat16"] = "float32"
    bias_update_speed: float = 0.001
    bias_update_stop_tokens: int | None = None
    mtp_lambda_late: float | None = None
    mtp_lambda_switch_tokens: int | None = None
    seed: int = 0
    data_layout: DataLayout = "per_host"
    log_every: int = 10
    run_dir: str | None = None
    name: str | None = None
    progress: bool = True
    tensorboard: bool = True
    peak_flops: float | None = None
    scaling_compute: float | None = None
    max_consecutive_skips: int = 10
    trainable: Literal["all", "mtp"] = "all"
    host_malloc: Literal["auto", "reuse", "system"] = "auto"

    def __post_init__(self):
        c = "TrainConfig"
        _check_finite(self)
        if self.task not in TASKS:
            _fail(c, "task", self.task, f"allowed: {list(TASKS)}")
        if self.trainable not in ("all", "mtp"):
            _fail(c, "trainable", self.trainable, "allowed: ['all', 'mtp']")
        if self.trainable == "mtp" and self.bias_update_speed != 0:
            _fail(
                c,
                "bias_update_speed",
                self.bias_update_speed,
                "must be 0 with trainable=mtp (the frozen main model's routing biases would move)",
            )
        if self.host_malloc not in ("auto", "reuse", "system"):
            _fail(c, "host_malloc", self.host_malloc, "allowed: ['auto', 'reuse', 'system']")
        if self.max_consecutive_skips < 0:
            _fail(c, "max_consecutive_skips", self.max_consecutive_skips, "must be >= 0")
        for name in ("steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                _fail(c, name, getattr(self, name), "must be >= 1")
        for name in ("warmup_steps", "seed"):
            if getattr(self, name) < 0:
                _fail(c, name, getattr(self, name), "must be >= 0")
        if self.lr <= 0:
            _fail(c, "lr", self.lr, "must be positive")
        for name in ("weight_decay", "clip_norm", "bias_update_speed", "eps"):
            if getattr(self, name) < 0:
                _fail(c, name, getattr(self, name), "must be >= 0")
        if self.schedule not in typing.get_args(Schedule):
            _fail(c, "schedule", self.schedule, f"allowed: {list(typing.get_args(Schedule))}")
        if self.data_layout not in typing.get_args(DataLayout):
            _fail(c, "data_layout", self.data_layout, "allowed: ['per_host', 'global']")
        if self.mu_dtype not in ("float32", "bfloat16"):
            _fail(c, "mu_dtype", self.mu_dtype, "allowed: ['float32', 'bfloat16']")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(c, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not 0 <= self.decay_start <= self.decay_end <= 1:
            _fail(c, "decay_start", self.decay_start, f"need 0 <= it <= {self.decay_end=} <= 1")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(c, name, getattr(self, name), "must be in [0, 1)")
        if len(self.step_boundaries) != len(self.step_factors):
            _fail(c, "step_factors", self.step_factors, "need one factor per step_boundaries entry")
        if list(self.step_boundaries) != sorted(self.step_boundaries) or not all(
            0 <= b <= 1 for b in self.step_boundaries
        ):
            _fail(c, "step_boundaries", self.step_boundaries, "increasing fractions in [0, 1]")
        for name in ("bias_update_stop_tokens", "mtp_lambda_switch_tokens", "mtp_lambda_late"):
            value = getattr(self, name)
            if value is not None and value < 0:
                _fail(c, name, value, "must be >= 0 or null")
        if (self.final_lr is None) != (self.final_lr_tokens is None):
            _fail(c, "final_lr", self.final_lr, "give final_lr and final_lr_tokens together")
        for name in ("decay_start_tokens", "decay_end_tokens", "final_lr_tokens", "final_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                _fail(c, name, value, "must be >= 0 or null")
        ends = [self.decay_start_tokens, self.decay_end_tokens, self.final_lr_tokens]
        ends = [e for e in ends if e is not None]
        if ends != sorted(ends):
            _fail(c, "decay_end_tokens", self.decay_end_tokens, "token boundaries must increase")
        if self.peak_flops is not None and self.peak_flops <= 0:
            _fail(c, "peak_flops", self.peak_flops, "must be positive or null (device table)")
        if self.scaling_compute is not None and not 0 < self.scaling_compute < float("inf"):
            _fail(c, "scaling_compute", self.scaling_compute, "a positive FLOP count or null")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing.

    Attributes:
      dir: checkpoint folder; None = <run_dir>/checkpoints.
      every: save every this many steps (0 = only on exit and on SIGTERM/SIGINT).
      keep: checkpoints kept (oldest deleted first).
      async_save: write in the background while training continues.
      resume: restore the latest readable checkpoint of `dir` when there is one (the default
        run_dir is a new timestamped folder per run: give train.name or train.run_dir to resume).
      save_final: save after the last step.
      keep_corrupt: unreadable steps set aside as `<step>.corrupt-<time>` that are kept for
        inspection (the oldest are deleted beyond this).
    """

    dir: str | None = None
    every: int = 100
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    save_final: bool = True
    keep_corrupt: int = 2

    def __post_init__(self):
        if self.keep_corrupt < 0:
            _fail("CheckpointConfig", "keep_corrupt", self.keep_corrupt, "must be >= 0")
        if self.every < 0:
            _fail("CheckpointConfig", "every", self.every, "must be >= 0 (0 = no periodic saves)")
        if self.keep < 1:
            _fail("CheckpointConfig", "keep", self.keep, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-process launch (`jax.distributed.initialize`).

    Without these fields the loop initialises only in a recognised multi-process environment:
    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID), Slurm with more than one
    task, Open MPI with more than one rank, or a multi-host TPU slice.

    Attributes:
      coordinator: "host:port" of process 0.
      num_processes: processes in the job.
      process_id: this process's index.
      initialize: "auto" (as above), "always" or "never".
      cpu_collectives: collectives implementation for multi-process CPU runs.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialize: Literal["auto", "always", "never"] = "auto"
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"

    def __post_init__(self):
        if self.initialize not in ("auto", "always", "never"):
            _fail("DistConfig", "initialize", self.initialize, "allowed: auto, always, never")
        if self.cpu_collectives not in ("gloo", "mpi"):
            _fail("DistConfig", "cpu_collectives", self.cpu_collectives, "allowed: gloo, mpi")
        if self.num_processes is not None and self.num_processes < 1:
            _fail("DistConfig", "num_processes", self.num_processes, "must be >= 1")
        if self.process_id is not None and self.num_processes is not None:
            if not 0 <= self.process_id < self.num_processes:
                allowed = f"must be in [0, num_processes={self.num_processes})"
                _fail("DistConfig", "process_id", self.process_id, allowed)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, one sub-config per concern."""

    model: ModelConfig
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    dist: DistConfig = DistConfig()
    pipeline: PipelineConfig = PipelineConfig()
    post: PostConfig = PostConfig()

    def __post_init__(self):
        T, max_pos = self.data.seq_len, self.model.max_position_embeddings
        if T > max_pos:
            raise ValueError(
                f"data.seq_len={T} exceeds model.max_position_embeddings={max_pos}: the model "
                "has no positions beyond it (lower data.seq_len or extend the context)"
            )
        B, A = self.data.global_batch_size, self.train.grad_accum
        if B % A:
            raise ValueError(
                f"data.global_batch_size={B} must be a multiple of train.grad_accum={A}"
            )
        ramp = self.data.batch_ramp_start
        if ramp is not None and (ramp % A or self.data.batch_ramp_increment % A):
            raise ValueError(
                f"data.batch_ramp_start={ramp} and batch_ramp_increment="
                f"{self.data.batch_ramp_increment} must be multiples of train.grad_accum={A}"
            )
        P, M = self.mesh.stage, self.pipeline.microbatches
        if (P > 1) != (self.pipeline.schedule != "none"):
            raise ValueError(
                f"mesh.stage={P} and pipeline.schedule={self.pipeline.schedule!r} disagree: "
                "a stage axis > 1 needs a schedule (1f1b, zb1p, dualpipe) and vice versa"
            )
        if P > 1:
            if B % M:
                raise ValueError(
                    f"data.global_batch_size={B} must be a multiple of pipeline.microbatches={M}"
                )
            if A != 1:
                raise ValueError(
                    "train.grad_accum must be 1 when pipelining (micro-batches are "
                    "the pipeline's: set pipeline.microbatches)"
                )
            self.pipeline.build(P)  # validates the schedule's size rules early
        self._check_post()

    def _check_post(self):
        task, post = self.train.task, self.post
        if task == "pretrain":
            return
        if post.data is None:
            raise ValueError(f"train.task={task!r} needs post.data (the chat JSONL file)")
        if self.mesh.stage > 1:
            raise ValueError(f"train.task={task!r} does not run on a pipeline (mesh.stage=1)")
        if task == "grpo":
            B, G = self.data.global_batch_size, post.group_size
            if B % G:
                raise ValueError(
                    f"data.global_batch_size={B} (completions per step) must be a multiple of "
                    f"post.group_size={G}"
                )
            if post.max_new_tokens >= self.data.seq_len:
                raise ValueError(
                    f"post.max_new_tokens={post.max_new_tokens} must be < data.seq_len="
                    f"{self.data.seq_len} (a row holds the prompt and the completion)"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form (the resolved config saved next to a run)."""
        out = {}
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            out[f.name] = sub.to_dict() if f.name == "model" else dataclasses.asdict(sub)
        out["data"]["paths"] = list(out["data"]["paths"])
        for key in ("step_boundaries", "step_factors"):
            out["train"][key] = list(out["train"][key])
        for key in ("rewards", "reward_weights"):
            out["post"][key] = list(out["post"][key])
        if self.train.task == "pretrain":  # pretraining configs read as before post-training
            del out["post"], out["train"]["task"]
            if self.train.init_from is None:
                del out["train"]["init_from"]
        return out


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "loss": LossConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "dist": DistConfig,
    "pipeline": PipelineConfig,
    "post": PostConfig,
}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Converts a YAML value to the annotated type `hint`, or raises naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or (dataclasses.is_dataclass(hint)):
        return value  # nested dataclasses (rope_scaling) are parsed by their owner
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ValueError(f"{where}={value!r} is invalid: expected {allowed}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where}={value!r} is invalid: allowed values {list(args)}")
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:  # "1e6" and 1e6 are accepted when integral
            f = float(value)
            if f.is_integer() and not isinstance(value, bool):
                return int(f)
        except (TypeError, ValueError):
            pass
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ValueError(f"{where}={value!r} is invalid: expected {_type_name(hint)}")


def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"run config file not found: {path} (a bare name such as train-sft-small is looked "
            f"up among the shipped run configs in {PRESET_DIR})"
        )
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}")
    for section, body in raw.items():
        if body is not None and not isinstance(body, dict):
            raise ValueError(
                f"{path}: section {section!r} must be a mapping of field: value, "
                f"got {type(body).__name__} {body!r}"
            )
    return raw


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parses `section.field[.sub]=value` strings into (key path, YAML value) pairs."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(
                f"override key {key!r} must be section.field (sections: {sorted(SECTIONS)})"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from None
        out.append((parts, value))
    return out


def _check_keys(section: str, raw: dict[str, Any], source: str) -> None:
    cls = SECTIONS[section]
    allowed = {f.name for f in dataclasses.fields(cls)} | (
        {"preset"} if section == "model" else set()
    )
    unknown = sorted(set(raw) - allowed)
    if unknown:
        names = ", ".join(f"{section}.{k}" for k in unknown)
        raise ValueError(
            f"{source}: unknown config key(s) {names}; {section} fields: {sorted(allowed)}"
        )


def _build_model(raw: dict[str, Any], source: str) -> ModelConfig:
    raw = dict(raw)
    preset = raw.pop("preset", None)
    merged: dict[str, Any] = {}
    if preset is not None:
        path = preset if os.path.isfile(str(preset)) else os.path.join(PRESET_DIR, f"{preset}.yaml")
        if not os.path.isfile(path):
            names = sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
            raise ValueError(f"{source}: model.preset={preset!r} is unknown; available: {names}")
        with open(path) as f:
            base = yaml.safe_load(f)
        merged.update(base.get("model", base))
    hints = _field_hints(ModelConfig)
    for key, value in raw.items():
        value = coerce(value, hints[key], f"model.{key}")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}  # e.g. model.rope_scaling.factor=8 over a preset
        merged[key] = value
    return ModelConfig.from_dict(merged, source=source)


def _build(cls: type, raw: dict[str, Any], section: str) -> Any:
    hints = _field_hints(cls)
    return cls(**{k: coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()})


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Reads a run config YAML (default configs/train-v3-small.yaml) and applies overrides.

    Args:
      path: YAML file with sections model, loss, data, mesh, train, checkpoint, dist, or the
        name of a shipped run config (`train-sft-small`, from the package's presets).
      overrides: `section.field=value` strings, applied in order after the file.
    Returns:
      The validated RunConfig.
    Raises:
      ValueError: an unknown section or field (named), or a value the field does not accept.
      FileNotFoundError: the YAML file or a model preset is missing.
    """
    path = DEFAULT_RUN_CONFIG if path is None else os.fspath(path)
    shipped = os.path.join(PRESET_DIR, path if path.endswith(".yaml") else path + ".yaml")
    if not os.path.isfile(path) and os.sep not in path and os.path.isfile(shipped):
        path = shipped  # a shipped run config by name, e.g. `--config train-sft-small`
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    raw = {s: dict(raw.get(s) or {}) for s in SECTIONS}
    for s in SECTIONS:
        _check_keys(s, raw[s], path)
    for parts, value in parse_overrides(list(overrides or [])):
        section, key = parts[0], parts[1]
        if section not in SECTIONS:
            raise ValueError(
                f"override {'.'.join(parts)}: unknown section {section!r}; "
                f"allowed: {sorted(SECTIONS)}"
            )
        _check_keys(section, {key: None}, "override")
        target = raw[section]
        for p in parts[1:-1]:  # nested mappings, e.g. model.rope_scaling.factor
            if not isinstance(target.get(p), dict):
                target[p] = {}
            target = target[p]
        target[parts[-1]] = value
    run = RunConfig(
        model=_build_model(raw["model"], path),
        **{s: _build(SECTIONS[s], raw[s], s) for s in SECTIONS if s != "model"},
    )
    if run.train.scaling_compute is not None:
        from deepseek_jax.scaling import apply_to_run  # scaling imports train.flops

        run = apply_to_run(run, run.train.scaling_compute)
    return run
