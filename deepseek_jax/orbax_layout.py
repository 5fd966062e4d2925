"""Our Orbax checkpoint layout (written by `deepseek_jax.convert`, restored by `load_orbax`).

An Orbax PyTree checkpoint of the model's NNX state: orbax's own `_METADATA` and
`_CHECKPOINT_METADATA` (zarr v2 arrays, no OCDBT, one array per parameter) plus our
`deepseek_jax.json` (the ModelConfig and the layout version). Arrays are restored with orbax into
the model's abstract state, optionally sharded over a mesh. Nothing here is specific to the
Hugging Face hub layout (`deepseek_jax.hf`).
"""

from __future__ import annotations

import json
import os
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


def open_orbax_arrays(root: str, maps: list[ParamMap]):
    """Opens each parameter's array of an Orbax PyTree checkpoint (ours or orbax's own, OCDBT or
    not) with tensorstore, checking presence and shape."""
    import tensorstore as ts

    meta_path = os.path.join(root, "_METADATA")
    if not os.path.isfile(meta_path):
        raise st.CheckpointError(f"{root}: no _METADATA (not an Orbax PyTree checkpoint)")
    with open(meta_path) as f:
        meta = json.load(f)
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    stores = {}
    for pm in maps:
        if meta.get("use_ocdbt"):
            kv = {"driver": "ocdbt", "base": {"driver": "file", "path": root}, "path": pm.name}
        else:
            kv = {"driver": "file", "path": os.path.join(root, pm.name)}
        if str(pm.path) not in meta["tree_metadata"]:
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
    restored = ocp.StandardCheckpointer().restore(directory, traverse_util.unflatten_dict(target))
    return _merge(graphdef, state, traverse_util.flatten_dict(restored))


def is_orbax_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "_METADATA"))
