"""Our Orbax checkpoint layout (written by `deepseek_jax.convert`, restored by `load_orbax`).

An Orbax PyTree checkpoint of the model's NNX state: orbax's own `_METADATA` and
`_CHECKPOINT_METADATA` (zarr v2 arrays, no OCDBT, one array per parameter) plus our
`deepseek_jax.json` (the ModelConfig and the layout version). Arrays are restored with orbax into
the model's abstract state, optionally sharded over a mesh. Nothing here is specific to the
Hugging Face hub layout (`deepseek_jax.hf`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf import safetensors_io as st
from deepseek_jax.hf.mapping import ParamMap
from deepseek_jax.restore import _merge, _sharding_fn, _with_dtypes, abstract_state

ORBAX_META_FILE = "deepseek_jax.json"  # our config, written beside orbax's own files
LAYOUT_VERSION = 1


def read_orbax_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, ORBAX_META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory}: no {ORBAX_META_FILE}; pass config= for Orbax checkpoints not written "
            "by deepseek_jax.convert"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise st.CheckpointError(
            f"{path}: layout_version={meta.get('layout_version')!r}, this code reads "
            f"{LAYOUT_VERSION}"
        )
    return ModelConfig.from_dict(meta["model_config"], source=path)


# ---- the Orbax layout (see deepseek_jax.convert) --------------------------------------------
def write_orbax_metadata(root: str, params, meta: dict[str, Any]) -> None:
    """orbax's `_METADATA` (PyTree structure of zarr v2 arrays, no OCDBT) + our JSON."""
    tree = {}
    for path, shape in params:
        tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2 = dict key
            "value_metadata": {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": list(shape),
            },
        }
    orbax_meta = {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }
    now = time.time_ns()
    step_meta = {
        "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
        "PyTreeCheckpointHandler",
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    for name, content in (
        (ORBAX_META_FILE, meta),
        ("_METADATA", orbax_meta),
        ("_CHECKPOINT_METADATA", step_meta),
    ):
        with open(os.path.join(root, name), "w") as f:
            json.dump(content, f, indent=1)


# Parameter paths renamed since checkpoints were first written, as (old, new) runs of path
# segments of equal length: a checkpoint written before a rename is read under its old names
# (converted model checkpoints here, training run folders in train/checkpoint.py), so that none
# has to be converted again. Checkpoints are always written with the new names.
RENAMED_PATHS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("ffn", "gate"), ("ffn", "router")),  # the MoE router (ffn/gate/* until 2026-12-05)
)


def orbax_metadata(root: str) -> dict:
    meta_path = os.path.join(root, "_METADATA")
    if not os.path.isfile(meta_path):
        raise st.CheckpointError(f"{root}: no _METADATA (not an Orbax PyTree checkpoint)")
    with open(meta_path) as f:
        return json.load(f)


def stored_paths(meta: dict) -> set[tuple[str, ...]]:
    """The parameter paths an Orbax `_METADATA` lists (ours and orbax's own write the same)."""
    return {
        tuple(str(k["key"]) for k in entry["key_metadata"])
        for entry in meta["tree_metadata"].values()
    }


def path_as_stored(path: tuple[str, ...], stored: set[tuple[str, ...]]) -> tuple[str, ...]:
    """`path` as the checkpoint names it: itself, or its name before a rename in
    `RENAMED_PATHS` where only that name is stored (else `path`, for the caller to report)."""
    if path in stored:
        return path
    for old, new in RENAMED_PATHS:
        for i in range(len(path) - len(new) + 1):
            if path[i : i + len(new)] == new:
                legacy = path[:i] + old + path[i + len(new) :]
                if legacy in stored:
                    return legacy
    return path


def open_orbax_arrays(root: str, maps: list[ParamMap]):
    """Opens each parameter's array of an Orbax PyTree checkpoint (ours or orbax's own, OCDBT or
    not) with tensorstore, checking presence and shape."""
    import tensorstore as ts

    meta = orbax_metadata(root)
    stored = stored_paths(meta)
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    stores = {}
    for pm in maps:
        path = path_as_stored(pm.path, stored)
        name = ".".join(path)
        if meta.get("use_ocdbt"):
            kv = {"driver": "ocdbt", "base": {"driver": "file", "path": root}, "path": name}
        else:
            kv = {"driver": "file", "path": os.path.join(root, name)}
        if path not in stored:
            raise st.CheckpointError(f"{root}: parameter {pm.name!r} is missing")
        # A missing chunk file (an interrupted copy) must fail the read, not read as zeros.
        spec = {"driver": driver, "kvstore": kv, "open": True, "fill_missing_data_reads": False}
        store = ts.open(spec, read=True).result()
        if tuple(store.shape) != pm.shape:
            raise st.CheckpointError(
                f"{root}: parameter {pm.name!r} has shape {list(store.shape)}, expected "
                f"{list(pm.shape)}"
            )
        stores[pm.path] = store
    return stores


def load_orbax(
    directory: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    config: ModelConfig | None = None,
):
    """Restores our Orbax checkpoint (a PyTree of the model's NNX state) into a DeepSeekModel.

    Arrays are restored straight into their target sharding (each device reads its part).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    cfg = _with_dtypes(config or read_orbax_config(directory), dtype, param_dtype)
    graphdef, state = abstract_state(cfg)
    sharding = _sharding_fn(mesh, rules)
    target = {}
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        target[path] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding(path, var))
    stored = stored_paths(orbax_metadata(directory))
    as_stored = {path: path_as_stored(path, stored) for path in target}
    _check_chunks(directory)
    with quiet_abandoned_reads():
        try:
            restored = ocp.StandardCheckpointer().restore(
                directory,
                traverse_util.unflatten_dict({as_stored[p]: v for p, v in target.items()}),
            )
        except Exception as e:  # Orbax raises a bare Exception per failed read
            raise _restore_error(directory, e) from e
    restored = traverse_util.flatten_dict(restored)
    return _merge(graphdef, state, {path: restored[as_stored[path]] for path in target})


def _check_chunks(directory: str) -> None:
    """Raises CheckpointError naming the first zarr v2 array of `directory` with a chunk file
    missing (an interrupted copy), before any read starts.

    Found during the restore instead, the failure abandons Orbax's reads of the other arrays, and
    their TensorStore callbacks print one "Event loop is closed" traceback each. Arrays whose
    fill value is null (what Orbax writes) store every chunk; others, OCDBT and zarr3 layouts are
    left to the restore.
    """
    for name in sorted(os.listdir(directory)):
        meta_path = os.path.join(directory, name, ".zarray")
        if not os.path.isfile(meta_path):
            continue
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("fill_value") is not None:
            continue
        grid = [-(-n // c) for n, c in zip(meta["shape"], meta["chunks"], strict=True)]
        sep = meta.get("dimension_separator", ".")
        present = set(os.listdir(os.path.join(directory, name)))
        for index in itertools.product(*(range(g) for g in grid)):
            key = sep.join(map(str, index)) if index else "0"
            if key not in present:
                chunk = "{" + ", ".join(map(str, index)) + "}"
                raise st.CheckpointError(
                    f"{directory}: cannot read Orbax array {name!r}: chunk {chunk} (file "
                    f"{os.path.join(directory, name, key)}) is missing"
                )


def _restore_error(directory: str, error: BaseException) -> st.CheckpointError:
    """A CheckpointError naming the array whose read failed (e.g. a corrupt chunk).

    Orbax wraps TensorStore's error (e.g. `FAILED_PRECONDITION: Error reading local file
    ".../<array>/1.0": ZSTD_decompressStream() failed`) in an Exception whose text is the whole
    TensorStore spec; the wrapped error names the file, whose folder under `directory` is the
    array.
    """
    cause = error
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return st.CheckpointError(f"{directory}: cannot restore the Orbax checkpoint: {error}")
    detail = str(cause)
    found = re.search(r'local file "([^"]+)"', detail)
    if found:
        rel = os.path.relpath(found.group(1), directory).split(os.sep)
        if len(rel) > 1 and rel[0] != "..":
            return st.CheckpointError(f"{directory}: cannot read Orbax array {rel[0]!r}: {detail}")
    return st.CheckpointError(f"{directory}: cannot restore the Orbax checkpoint: {detail}")


# orbax.checkpoint's coroutine that reads one array's shard (serialization.py).
_ORBAX_SHARD_READ = "_read_array_index_and_device_put"


def _is_closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


@contextlib.contextmanager
def quiet_abandoned_reads():
    """Silences the reports of the reads a failing Orbax restore abandons.

    When one array of a step cannot be read, Orbax's restore raises while the reads of the other
    arrays are still in flight. Each then reports into a closed event loop, some time later:
    asyncio logs an "Event loop is closed" error, TensorStore's completion callbacks raise the
    same error where nothing can catch it, and Orbax's read coroutines are collected with their
    read errors inside; Python prints each of the last two as "Exception ignored in ..." with a
    traceback (dozens per step, after the caller's own clear error). The failure itself is
    reported by the caller (`load_orbax`, `train.checkpoint.Checkpointer.restore`).

    The asyncio log filter lasts for the context. The unraisable reports come from other threads
    and the garbage collector, after the context has ended, so a restore that fails installs
    `_drop_abandoned_read_reports` for the rest of the process. Everything else passes through.
    """
    logger = logging.getLogger("asyncio")

    def drop_closed_loop(record: logging.LogRecord) -> bool:
        return not _is_closed_loop(record.exc_info[1] if record.exc_info else None)

    logger.addFilter(drop_closed_loop)
    try:
        yield
    except BaseException:
        _drop_abandoned_read_reports()
        raise
    finally:
        logger.removeFilter(drop_closed_loop)


def _drop_abandoned_read_reports() -> None:
    """Wraps `sys.unraisablehook` (once) so that it drops the two reports abandoned Orbax reads
    leave, "Event loop is closed" and an Orbax shard-read coroutine collected unfinished, and
    hands every other unraisable exception to the hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        coroutine = getattr(unraisable.object, "__qualname__", None)
        if _is_closed_loop(unraisable.exc_value) or coroutine == _ORBAX_SHARD_READ:
            return
        previous(unraisable)

    hook._drops_abandoned_reads = True
    sys.unraisablehook = hook


def is_orbax_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "_METADATA"))
