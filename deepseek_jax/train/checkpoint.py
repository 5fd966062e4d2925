"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata.

Layout of `<dir>/<step>/`:
  state/  the TrainState (params, optimizer state, routing biases, step, RNG, skip counter) as
          sharded arrays (Orbax PyTreeSave; every process writes its shards);
  data/   one JSON file per process, `process_<i>-of-<n>.json`, the grain iterator state taken
          *when the save is requested* (positions and counters, never data);
  meta/   JSON written by process 0: the step and the resolved run config (for people).

Orbax writes a step into a temporary folder and renames it when every item is complete, so a save
interrupted by a crash leaves no `<step>` folder and is ignored. A `<step>` folder that exists but
cannot be read (a truncated or deleted file) is detected when restoring: the manager warns, moves
it aside to `<step>.corrupt` and uses the previous step. If *no* checkpoint can be read the
restore fails with the first error instead, since that usually means a changed config rather than
damaged files. A step written before a parameter rename (`orbax_layout.RENAMED_PATHS`) is read
under its old names and returned under today's.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

try:  # private in orbax (no public alias); only the save-time tuning below depends on it
    from orbax.checkpoint._src.metadata import array_metadata_store
except ImportError:  # a later orbax moved it: save with orbax's own handler (same files)
    array_metadata_store = None

from deepseek_jax.orbax_layout import (
    orbax_metadata,
    path_as_stored,
    quiet_abandoned_reads,
    stored_paths,
)
from deepseek_jax.sharding.rules import key_name
from deepseek_jax.train.config import CheckpointConfig

log = logging.getLogger(__name__)


class ChecksumError(ValueError):
    """A restored array or document differs from what was saved."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (one per element, two for 64-bit types), flat."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksums(tree) -> list[jax.Array]:
    """Per leaf [2] uint32: the sum of its 32-bit words and the sum of word_i * (2i + 1), both
    mod 2**32. Any single flipped bit changes both; a swap of two words changes the second."""
    out = []
    for x in jax.tree.leaves(tree):
        w = _words(x)
        odd = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.stack([w.sum(dtype=jnp.uint32), (w * odd).sum(dtype=jnp.uint32)]))
    return out


def array_checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of every array of `tree`, computed where it lives (one
    small reduction per array, all-reduced over its shards), for storing in JSON."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    values = _checksums(tree)
    host = [np.asarray(v.addressable_data(0)) for v in values]
    return {p: [int(v[0]), int(v[1])] for p, v in zip(paths, host, strict=True)}


def verify_checksums(tree: Any, stored: dict[str, list[int]], where: str) -> None:
    """Raises ChecksumError naming the arrays of `tree` whose checksums differ from `stored`."""
    actual = array_checksums(tree)
    bad = sorted(p for p in set(actual) | set(stored) if actual.get(p) != stored.get(p))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ChecksumError(f"{where}: checksum mismatch in {len(bad)} array(s): {shown}")


class DataStateHandler(ocp.CheckpointHandler):
    """Saves one JSON document per process (the data-iterator state of that host)."""

    def save(self, directory: epath.Path, args: DataStateSave):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        text = json.dumps(args.state, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        (directory / name).write_text(json.dumps({"sha256": digest, "state": args.state}))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a different process count"
            )
        doc = json.loads(path.read_text())
        text = json.dumps(doc["state"], sort_keys=True)
        if hashlib.sha256(text.encode()).hexdigest() != doc["sha256"]:
            raise ChecksumError(f"{path}: the data-iterator state does not match its checksum")
        return doc["state"]

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any  # a JSON-serialisable snapshot (grain's get_state())


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# Orbax's default (off only on GPU) splits each replicated array into one slice per replica, each
# written by its own device; every slice is an eager op compiled per shape and device, ~12 s per
# save of a 0.15M-parameter model over 8 CPU devices. Slices smaller than this are not worth it:
# such an array is written whole by one replica (same files, same restore).
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's standard array handlers, with replica-parallel writes only for large slices."""
    if array_metadata_store is None:
        return ocp.PyTreeCheckpointHandler()
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        *[(t, th.ScalarHandler()) for t in (int, float, bytes, np.number)],
        (np.ndarray, th.NumpyHandler()),
        (
            jax.Array,
            th.ArrayHandler(
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                array_metadata_store=array_metadata_store.Store(),
            ),
        ),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _abstract(tree):
    """ShapeDtypeStructs (with shardings when known) for PyTreeRestore targets."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _legacy_names(tree, stored: set[tuple[str, ...]]) -> tuple[dict, dict]:
    """The dict-key renames that read `tree` from a checkpoint that stores `stored`, written
    before a parameter rename (`orbax_layout.RENAMED_PATHS`): ({path in tree's names: old key},
    {path in the stored names: today's key}); both empty for a checkpoint of today's names."""
    to_old, to_new = {}, {}
    for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = tuple(key_name(k) for k in key_path)
        old = path_as_stored(path, stored)
        for i, (today, then) in enumerate(zip(path, old, strict=True)):
            if today != then:
                to_old[path[: i + 1]] = then
                to_new[old[: i + 1]] = today
    return to_old, to_new


def _renamed_keys(tree, names: dict[tuple[str, ...], str], path: tuple[str, ...] = ()):
    """`tree` with the dict key at each path of `names` renamed to its value (dicts, lists,
    tuples and NamedTuples are walked, as the train state and its optimizer state are built)."""
    if not names:
        return tree
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            here = (*path, str(k))
            out[names.get(here, k)] = _renamed_keys(v, names, here)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(
            *(_renamed_keys(v, names, (*path, f)) for f, v in zip(tree._fields, tree, strict=True))
        )
    if isinstance(tree, (tuple, list)):
        return type(tree)(_renamed_keys(v, names, (*path, str(i))) for i, v in enumerate(tree))
    return tree


class Checkpointer:
    """Saves and restores (state, data state) with Orbax's CheckpointManager.

    Args:
      directory: checkpoint folder (created).
      cfg: how often and how many to keep, async or not.
      metadata: JSON-serialisable run description stored with every step.
    """

    def __init__(self, directory: str, cfg: CheckpointConfig, metadata: dict | None = None):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"checkpoint.dir={directory!r} is a file, not a folder: checkpoints cannot be "
                "written there (remove it or point checkpoint.dir elsewhere)"
            )
        parent = self.directory
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"checkpoint.dir={directory!r}: {parent} is not writable")
        self.cfg = cfg
        self.metadata = metadata or {}
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.keep,
            enable_async_checkpointing=self.cfg.async_save,
            create=True,
        )
        handlers = {
            "state": _state_handler(),
            "data": DataStateHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, state: Any, data_state: Any, *, wait: bool = False) -> None:
        """Starts saving `step` (in the background when async); `wait` blocks until written.

        Args:
          step: the number of completed steps (the folder name).
          state: a pytree of jax.Arrays (e.g. `TrainState._asdict()`).
          data_state: this host's iterator state, already snapshotted (a dict).
          wait: block until the checkpoint is committed (on exit and on signals).
        """
        if step in self._manager.all_steps():
            log.info(
                "checkpoint step %d already exists in %s; not saved again", step, self.directory
            )
        else:
            meta = {"step": step, "time": time.time(), **self.metadata}
            meta["checksums"] = array_checksums(state)  # verified on restore
            args = ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=DataStateSave(data_state),
                meta=ocp.args.JsonSave(meta),
            )
            self._manager.save(step, args=args, force=True)
        if wait:
            self._manager.wait_until_finished()

    def restore(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
        """Restores the newest readable checkpoint.

        Args:
          abstract_state: the state's structure as arrays or ShapeDtypeStructs; their shardings
            (when present) place the restored arrays directly.
        Returns:
          (step, state, data state), or None when the folder holds no checkpoint.
        Raises:
          RuntimeError: checkpoints exist but none can be read (names the folder and the error).
        """
        steps = self.all_steps()
        if not steps:
            return None
        target = _abstract(abstract_state)
        failures: list[tuple[int, Exception]] = []
        for step in reversed(steps):
            # A step written before a parameter rename is read under its old names.
            to_old, to_new = _legacy_names(target, self._stored_state_paths(step))
            step_target = _renamed_keys(target, to_old)
            try:
                with quiet_abandoned_reads():
                    restored = self._manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.PyTreeRestore(
                                step_target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(
                                    step_target
                                ),
                            ),
                            data=DataStateRestore(),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
                checksums = restored["meta"].get("checksums")
                if checksums is None:
                    raise ChecksumError("no array checksums stored with this step")
                verify_checksums(restored["state"], checksums, f"step {step}")
            except Exception as e:  # any unreadable or damaged item makes the step unusable
                failures.append((step, e))
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e)[:300]}); trying the previous one",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
            return step, _renamed_keys(restored["state"], to_new), restored["data"]
        step, err = failures[0]
        raise RuntimeError(
            f"no checkpoint in {self.directory} can be restored (steps {steps}); the newest, "
            f"step {step}, failed with {type(err).__name__}: {err}. A changed model, optimizer "
            "or mesh config cannot resume an old run: use a new checkpoint.dir."
        ) from err

    def _stored_state_paths(self, step: int) -> set[tuple[str, ...]]:
        """The array paths step `step`'s state holds (empty where its metadata is unreadable:
        the restore then reports the damage)."""
        try:
            return stored_paths(orbax_metadata(os.path.join(self.directory, str(step), "state")))
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps to `<step>.corrupt-<time>` so new saves can reuse the step,
        keeping the newest `cfg.keep_corrupt` of those folders."""
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = f"{src}.corrupt-{time.time_ns()}"
                if os.path.isdir(src):
                    os.rename(src, dst)
                    warnings.warn(
                        f"moved unreadable checkpoint {src} to {dst}", RuntimeWarning, stacklevel=3
                    )
            aside = glob.glob(os.path.join(glob.escape(self.directory), "*.corrupt-*"))
            aside.sort(key=lambda p: int(p.rsplit("-", 1)[1]) if p[-1].isdigit() else 0)
            for old in aside[: max(0, len(aside) - self.cfg.keep_corrupt)]:
                shutil.rmtree(old, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("deepseek_jax_checkpoint_set_aside")
        self._manager.close()
        self._manager = self._open()

    def stored_config(self) -> tuple[int, dict] | None:
        """(step, run config) stored with the newest step whose metadata reads, or None."""
        for step in reversed(self.all_steps()):
            try:
                with quiet_abandoned_reads():
                    meta = self._manager.restore(
                        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                    )["meta"]
            except Exception:  # restore() reports unreadable steps
                continue
            if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
                return step, meta["config"]
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
