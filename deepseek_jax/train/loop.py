"""The training driver: one code path for one process or many.

`run(cfg)`:
  1. joins the multi-process job when there is one (`jax.distributed.initialize`, see DistConfig);
  2. builds the mesh and sharding rules from `cfg.mesh`;
  3. restores the newest readable checkpoint, or creates params and optimizer state directly in
     their shardings (`init_train_state`: jit with out_shardings, nothing built on one host);
  4. streams batches from the grain pipeline; each host's rows become one global jax.Array
     (`jax.make_array_from_process_local_data`, or from the full batch when every host reads the
     same stream, `train.data_layout=global`);
  5. steps, logs every `train.log_every` steps, checkpoints every `checkpoint.every` steps, on
     SIGTERM/SIGINT (then stops) and at the end.

`train.task` other than "pretrain" (sft, dpo, grpo) runs train/post_run.py's loop after step 1's
locking, with the same step, checkpoints and metrics files.

`main(argv)` is `python train_main.py [--config FILE] [section.field=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from deepseek_jax import host_memory
from deepseek_jax.data import load_tokenizer, make_dataset
from deepseek_jax.params import count_params
from deepseek_jax.sharding.mesh import make_mesh
from deepseek_jax.sharding.rules import batch_sharding, get_rules
from deepseek_jax.train.checkpoint import Checkpointer
from deepseek_jax.train.config import DistConfig, RunConfig, TrainConfig, load_run_config
from deepseek_jax.train.flops import describe_peak, flops_per_token, mfu
from deepseek_jax.train.metrics import MetricsLogger, real_tokens, token_rates
from deepseek_jax.train.resume import ConfigChangeError, check_resume
from deepseek_jax.train.runlock import RunLock, RunLockedError
from deepseek_jax.train.step import RunShapes, TrainState, init_train_state, make_train_step
from deepseek_jax.train.trainable import load_initial_params


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _env_is_multiprocess() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(cfg: DistConfig) -> bool:
    """Calls `jax.distributed.initialize` when this is a multi-process job (see DistConfig).

    Fields left None fall back to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, then
    to JAX's own cluster detection (Slurm, Open MPI, TPU). Returns whether it initialised.
    """
    explicit = any(v is not None for v in (cfg.coordinator, cfg.num_processes, cfg.process_id))
    if cfg.initialize == "never" or jax.distributed.is_initialized():
        return False
    if cfg.initialize == "auto" and not explicit and not _env_is_multiprocess():
        return False
    env = os.environ
    num = cfg.num_processes
    if num is None and env.get("JAX_NUM_PROCESSES"):
        num = int(env["JAX_NUM_PROCESSES"])
    pid = cfg.process_id
    if pid is None and env.get("JAX_PROCESS_ID"):
        pid = int(env["JAX_PROCESS_ID"])
    # Only read by the CPU client; multi-process CPU runs need a collectives implementation.
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator, num_processes=num, process_id=pid
    )
    return True


def resolve_run_dir(tcfg: TrainConfig) -> str:
    """`train.run_dir`, else runs/<name>, else runs/<timestamp of process 0>."""
    if tcfg.run_dir:
        return tcfg.run_dir
    if tcfg.name:
        return os.path.join("runs", tcfg.name)
    stamp = np.int64(time.time())
    if jax.process_count() > 1:  # every process must name the same folder
        stamp = multihost_utils.broadcast_one_to_all(stamp)
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.localtime(int(stamp))))


def to_global(local: dict[str, np.ndarray], sharding, *, full_batch: bool) -> dict[str, jax.Array]:
    """This host's batch rows -> global arrays [B, T] laid out by `sharding`.

    Args:
      local: [B / processes, T] arrays (or the full [B, T] batch when `full_batch`).
      sharding: the batch NamedSharding.
      full_batch: every host holds the whole batch and keeps the rows its devices own.
    """
    if full_batch:
        return {
            k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in local.items()
        }
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _host(x) -> np.ndarray:
    # Metrics are replicated: any local shard holds the value, even when not fully addressable.
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a stop request (save, then exit); a second one acts
    as usual. In multi-process runs the request is OR-ed over processes, so all stop together."""

    def __init__(self):
        self.flag = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True
        self.signum = signum
        signal.signal(signum, self._old[signum])
        _say(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint and stopping")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(multihost_utils.process_allgather(np.int32(self.flag)).max())


def check_vocab(cfg: RunConfig):
    """The run's tokenizer; an error when the model's vocabulary cannot hold its ids."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ({cfg.data.tokenizer})"
        )
    return tokenizer


def open_run(cfg: RunConfig, run_dir: str, ckpt_dir: str, allow_config_change: bool):
    """(Checkpointer, stored (step, config) or None): a stored config is compared with this one
    (train/resume.py), then this config is written to run_dir/config.yaml."""
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint, metadata={"config": cfg.to_dict()})
    stored = ckpt.stored_config() if cfg.checkpoint.resume else None
    if stored is not None:
        for line in check_resume(
            stored[1], cfg.to_dict(), step=stored[0], where=ckpt_dir, allow=allow_config_change
        ):
            _say(line)
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return ckpt, stored


def _log_line(step: int, r: dict[str, Any]) -> str:
    parts = [f"step {step:>6d}", f"loss {r['loss']:.4f}", f"main {r['main_loss']:.4f}"]
    if "mtp_loss" in r:
        parts.append(f"mtp {r['mtp_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}"]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.2f}%")
    if "expert_load_max_mean" in r:
        parts.append(f"load max/mean {r['expert_load_max_mean']:.2f}")
    if r.get("dropped_mean"):
        parts.append(f"dropped {100 * r['dropped_mean']:.2f}%")
    if r.get("skipped"):
        parts.append(f"skipped {r['skipped']}")
    return " | ".join(parts)


class TooManySkipsError(RuntimeError):
    """`train.max_consecutive_skips` consecutive steps had a non-finite loss or update."""


def _lock_run(run_dir: str, ckpt_dir: str) -> list[RunLock]:
    """Process 0 locks the run folder (and an outside checkpoint folder); every process learns
    whether that worked, so all stop together when another run holds them."""
    locks, error = [], ""
    if jax.process_index() == 0:
        try:
            for folder, what in ((run_dir, "run folder"), (ckpt_dir, "checkpoint.dir")):
                if what == "run folder" or os.path.commonpath([run_dir, ckpt_dir]) != run_dir:
                    locks.append(RunLock(folder, what).acquire())
        except (RunLockedError, NotADirectoryError) as e:
            error = str(e)
    if jax.process_count() > 1:
        code = np.int32(1 if error else 0)
        if multihost_utils.broadcast_one_to_all(code) and not error:
            error = "process 0 could not lock the run folder (see its log)"
    if error:
        for lock in locks:
            lock.release()
        raise RunLockedError(error)
    return locks


def run(
    cfg: RunConfig,
    *,
    on_step: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains according to `cfg`; returns the end-of-run summary.

    Args:
      cfg: the run config (see train.config).
      on_step: called with the step number after every step and its logging, before the
        checkpoint decision (a SIGTERM sent from it saves that step); for notebooks and tests.
      allow_config_change: resume even when the config stored with the checkpoint differs in
        fields that break the run (train.resume); otherwise that is refused.
    Returns:
      The summary dict of `MetricsLogger.summary` plus `history` (the logged records),
      `finished` (all `train.steps` done) and `stop_signal` (the signal's name, or None).
    Raises:
      RunLockedError: another live run holds the run folder.
      ConfigChangeError: resuming with a config the checkpointed run cannot continue with.
      TooManySkipsError: `train.max_consecutive_skips` consecutive steps were skipped.
    """
    host_memory.configure(cfg.train.host_malloc)  # before JAX's backends start
    initialize_distributed(cfg.dist)
    tcfg = cfg.train
    run_dir = os.path.abspath(resolve_run_dir(tcfg))
    ckpt_dir = os.path.abspath(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"))
    for key, folder in (("train.run_dir", run_dir), ("checkpoint.dir", ckpt_dir)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(
                f"{key}={folder!r} is a file, not a folder: the run cannot write there "
                f"(remove it or set {key} to a folder)"
            )
    locks = _lock_run(run_dir, ckpt_dir)
    try:
        if tcfg.task != "pretrain":
            return _run_post(cfg, run_dir, ckpt_dir, on_step, allow_config_change)
        return _run(cfg, run_dir, ckpt_dir, on_step, allow_config_change)
    finally:
        for lock in locks:
            lock.release()


def _run_post(cfg, run_dir, ckpt_dir, on_step, allow_config_change) -> dict[str, Any]:
    from deepseek_jax.train.post_run import run_post  # imports the generation engine

    signals = StopSignals()
    with signals:
        summary = run_post(
            cfg,
            run_dir,
            ckpt_dir,
            on_step=on_step,
            allow_config_change=allow_config_change,
            signals=signals,
        )
    summary["stop_signal"] = None if signals.signum is None else signal.Signals(signals.signum).name
    return summary


def _run(cfg, run_dir, ckpt_dir, on_step, allow_config_change) -> dict[str, Any]:
    init_model = None
    # Continued pretraining / post-training from given weights (the checkpoint's model config);
    # an MTP-only run keeps its own config and loads what the checkpoint has (below).
    if cfg.train.init_from is not None and cfg.train.trainable != "mtp":
        from deepseek_jax.train.post_run import resolve_init

        cfg, init_model = resolve_init(cfg)
    tcfg = cfg.train
    mesh = make_mesh(cfg.mesh)
    rules = get_rules(cfg.mesh.rules)
    tokenizer = check_vocab(cfg)
    ckpt, stored = open_run(cfg, run_dir, ckpt_dir, allow_config_change)
    # The model and optimizer as shapes, built once: counts, restore, init and the step use it.
    shapes = RunShapes.build(cfg.model, tcfg, seed=tcfg.seed, data=cfg.data)
    counts = count_params(cfg.model, model=shapes.model)
    _say(f"run_dir {run_dir}")
    _say(
        f"model: {counts.total / 1e6:.2f}M params ({counts.activated / 1e6:.2f}M activated, "
        f"+{counts.mtp / 1e6:.2f}M MTP); mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)"
    )
    if cfg.model.is_moe and cfg.model.moe_impl == "capacity":  # V3 itself never drops tokens
        _say(
            f"note: model.moe_impl=capacity (capacity_factor={cfg.model.capacity_factor}) drops "
            "the (token, expert) assignments past each expert's capacity; the fraction is logged "
            "as `dropped` (metrics.jsonl, log line). model.moe_impl=dropless is exact V3 routing."
        )

    full_batch = tcfg.data_layout == "global"
    data_index, data_count = (0, 1) if full_batch else (jax.process_index(), jax.process_count())
    iterator = iter(
        make_dataset(
            cfg.data, process_index=data_index, process_count=data_count, tokenizer=tokenizer
        )
    )
    graphdef, abstract = shapes.graphdef, shapes.state
    shardings = shapes.shardings(mesh, rules)
    restored = None
    if cfg.checkpoint.resume:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        restored = ckpt.restore(target._asdict())
    if restored is not None:
        start, state_dict, data_state = restored
        state = TrainState(**state_dict)
        try:
            iterator.set_state(data_state)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigChangeError(
                f"the data-iterator state of step {start} in {ckpt.directory} does not fit this "
                f"data pipeline ({type(e).__name__}: {e}); it was written by a differently "
                "configured data section"
            ) from e
        _say(f"resumed from step {start} ({ckpt.directory})")
    elif init_model is not None:
        from deepseek_jax.train.post_run import state_from_model

        graphdef, state = state_from_model(init_model, cfg, mesh, rules, shapes=shapes)
        start = 0
    else:
        graphdef, state = init_train_state(
            cfg.model, tcfg, seed=tcfg.seed, mesh=mesh, rules=rules, shapes=shapes
        )
        start = 0
        if tcfg.init_from is not None:
            state, n_in, n_new = load_initial_params(state, graphdef, tcfg.init_from)
            _say(f"init_from {tcfg.init_from}: {n_in} arrays loaded, {n_new} freshly initialised")
    step_fn = make_train_step(
        cfg.model,
        cfg.loss,
        tcfg,
        graphdef,
        mesh=mesh,
        rules=rules,
        pipeline=cfg.pipeline,
        data=cfg.data,
        shapes=shapes,
    )
    sharding = batch_sharding(mesh, rules)

    flops_token = flops_per_token(cfg.model, cfg.data.seq_len).total
    try:
        peak, peak_source = describe_peak(override=tcfg.peak_flops)
        _say(f"MFU peak per device {peak:.3g} FLOP/s: {peak_source}")
    except ValueError as e:
        _say(f"warning: {e}; MFU not reported")
        peak = None
    logger = MetricsLogger(
        run_dir,
        total_steps=tcfg.steps,
        start_step=start,
        enabled=jax.process_index() == 0,
        tensorboard=tcfg.tensorboard,
        progress=tcfg.progress,
    )
    step, mark, pending, saved = start, None, None, start if restored is not None else -1
    counted, hosts = (0.0, 0.0), 1 if full_batch else jax.process_count()  # since `mark`
    unread: list[tuple[int, jax.Array]] = []  # (step, finite) not yet looked at on the host
    batch_shapes: set[tuple[int, ...]] = set()  # compiled so far (one per ramp batch size)
    streak: list[int] = []  # the current run of consecutive skipped steps

    def check_skips(upto: int) -> None:
        """Reads `finite` of steps <= upto (already computed) and stops on too long a streak."""
        while unread and unread[0][0] <= upto:
            s, finite = unread.pop(0)
            if _host(finite) > 0:
                streak.clear()
            else:
                streak.append(s)
        limit = tcfg.max_consecutive_skips
        if limit and len(streak) >= limit:
            raise TooManySkipsError(
                f"{len(streak)} consecutive steps ({streak[0]}..{streak[-1]}) were skipped for a "
                "non-finite loss, gradient or update (train.max_consecutive_skips="
                f"{limit}); the run stops without saving, the newest checkpoint in "
                f"{ckpt.directory} is the last good state. Check train.lr and the data."
            )

    signals = StopSignals()
    try:
        with signals:
            while step < tcfg.steps:
                try:
                    local = next(iterator)
                except StopIteration:
                    _say(f"data exhausted after {step} steps")
                    break
                state, metrics = step_fn(state, to_global(local, sharding, full_batch=full_batch))
                step += 1
                counted = tuple(
                    a + b for a, b in zip(counted, real_tokens(local, hosts), strict=True)
                )
                shape = np.shape(local["input_ids"])
                if mark is None or shape not in batch_shapes:
                    # The first step, and the first of each new batch size (V3's batch ramp),
                    # include compilation: the throughput window restarts after them.
                    batch_shapes.add(shape)
                    jax.block_until_ready(metrics)
                    if pending is not None:
                        check_skips(step - 1)
                    mark, counted = (time.time(), step), (0.0, 0.0)
                elif pending is not None:
                    jax.block_until_ready(pending)  # keep at most one step in flight
                    check_skips(step - 1)
                pending = metrics["loss"]
                unread.append((step, metrics["finite"]))
                logger.advance(step)
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    host = {k: _host(v) for k, v in metrics.items()}
                    host["sequences"] = shape[0] * hosts  # this step's global batch (ramp)
                    now = time.time()
                    n = step - mark[1]
                    if n > 0:
                        host.update(token_rates(*counted, now - mark[0]))
                        rate = host["tokens_per_s"]  # non-padding tokens: MFU counts useful work
                        host["step_time_s"] = (now - mark[0]) / n
                        if peak is not None:
                            host["mfu"] = mfu(rate, flops_token, jax.device_count(), peak)
                    mark, counted = (now, step), (0.0, 0.0)
                    record = logger.log(step, host)
                    if jax.process_index() == 0:
                        line = _log_line(step, record)
                        if tcfg.progress:
                            from tqdm import tqdm

                            tqdm.write(line, file=sys.stderr)
                        else:
                            print(line, file=sys.stderr, flush=True)
                if on_step is not None:
                    on_step(step)
                stop = signals.requested()
                if ckpt.should_save(step) or stop:
                    check_skips(step)  # never replace a good checkpoint during a streak
                    # A snapshot of the iterator *now*: it has consumed exactly `step` batches.
                    data_state = json.loads(json.dumps(iterator.get_state()))
                    ckpt.save(step, state._asdict(), data_state, wait=stop)
                    saved = step
                if stop:
                    break
        check_skips(step)
        if cfg.checkpoint.save_final and saved != step:
            ckpt.save(step, state._asdict(), json.loads(json.dumps(iterator.get_state())))
    finally:
        ckpt.close()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        summary = logger.close()
    summary["history"] = logger.history
    summary["finished"] = step >= tcfg.steps
    summary["stop_signal"] = None if signals.signum is None else signal.Signals(signals.signum).name
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: `train_main.py [--config FILE] [--print-config] [section.field=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="train_main.py",
        description="Train a DeepSeek-V2/V3 model. With no arguments: the small V3 on CPU on the "
        "shipped corpus (configs/train-v3-small.yaml).",
    )
    parser.add_argument("--config", help="run config YAML (default configs/train-v3-small.yaml)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even when the checkpoint's run config differs in fields that break the run",
    )
    parser.add_argument(
        "overrides", nargs="*", help="section.field=value, e.g. train.steps=100 mesh.fsdp=8"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    try:
        summary = run(cfg, allow_config_change=args.allow_config_change)
    except (RunLockedError, ConfigChangeError, TooManySkipsError, NotADirectoryError) as e:
        print(f"train_main.py: error: {e}", file=sys.stderr)
        return 1
    if summary["stop_signal"] is not None and not summary["finished"]:
        _say(f"stopped by {summary['stop_signal']} before train.steps: exiting non-zero")
        return 128 + signal.Signals[summary["stop_signal"]].value
    return 0
