"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata.

Layout of `<dir>/<step>/`:
  state/  the TrainState (params, optimizer state, routing biases, step, RNG, skip counter) as
          sharded arrays (Orbax StandardSave; every process writes its shards);
  data/   one JSON file per process, `process_<i>-of-<n>.json`, the grain iterator state taken
          *when the save is requested* (positions and counters, never data);
  meta/   JSON written by process 0: the step and the resolved run config (for people).

Orbax writes a step into a temporary folder and renames it when every item is complete, so a save
interrupted by a crash leaves no `<step>` folder and is ignored. A `<step>` folder that exists but
cannot be read (a truncated or deleted file) is detected when restoring: the manager warns, moves
it aside to `<step>.corrupt` and uses the previous step. If *no* checkpoint can be read the
restore fails with the first error instead, since that usually means a changed config rather than
damaged files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from deepseek_jax.train.config import CheckpointConfig

log = logging.getLogger(__name__)


class DataStateHandler(ocp.CheckpointHandler):
    """Saves one JSON document per process (the data-iterator state of that host)."""

    def save(self, directory: epath.Path, args: DataStateSave):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a different process count"
            )
        return json.loads(path.read_text())

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


def _abstract(tree):
    """ShapeDtypeStructs (with shardings when known) for StandardRestore targets."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class Checkpointer:
    """Saves and restores (state, data state) with Orbax's CheckpointManager.

    Args:
      directory: checkpoint folder (created).
      cfg: how often and how many to keep, async or not.
      metadata: JSON-serialisable run description stored with every step.
    """

    def __init__(self, directory: str, cfg: CheckpointConfig, metadata: dict | None = None):
        self.directory = os.path.abspath(directory)
        self.cfg = cfg
        self.metadata = metadata or {}
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.keep,
            enable_async_checkpointing=self.cfg.async_save,
            create=True,
        )
        return ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

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
            args = ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataStateSave(data_state),
                meta=ocp.args.JsonSave({"step": step, "time": time.time(), **self.metadata}),
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
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=DataStateRestore()
                    ),
                )
            except Exception as e:  # any unreadable item makes the step unusable
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
            return step, restored["state"], restored["data"]
        step, err = failures[0]
        raise RuntimeError(
            f"no checkpoint in {self.directory} can be restored (steps {steps}); the newest, "
            f"step {step}, failed with {type(err).__name__}: {err}. A changed model, optimizer "
            "or mesh config cannot resume an old run: use a new checkpoint.dir."
        ) from err

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps to `<step>.corrupt` so new saves can reuse the step."""
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = f"{src}.corrupt-{int(time.time())}"
                if os.path.isdir(src):
                    os.rename(src, dst)
                    log.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("deepseek_jax_checkpoint_set_aside")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
