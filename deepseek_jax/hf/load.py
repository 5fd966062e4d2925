"""`load_pretrained`: a DeepSeek model from a hub checkpoint folder or our Orbax checkpoint.

Hub folders: DeepSeek-V2/V3 (`deepseek_v2`, `deepseek_v3`) and DeepSeek LLM / DeepSeekMath, whose
checkpoints are `LlamaForCausalLM` (`llama`: standard attention, dense FFN in every layer).

A hub folder is opened in two steps. `open_hf` reads config.json and every safetensors header
(cheap: a few KB per shard) and checks them against `mapping.param_maps(cfg)`: each missing,
unexpected, wrongly shaped or wrongly typed tensor is reported with its name and file before a
single weight is read. Then each parameter is assembled piece by piece (FP8 blocks dequantized
on the CPU) and placed on its device(s). Orbax checkpoints (written by `deepseek_jax.convert`)
are restored with orbax into the model's abstract state, optionally sharded over a mesh; the
files of that layout (orbax's `_METADATA`, our `deepseek_jax.json`) are written and opened here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf import fp8_params
from deepseek_jax.hf import safetensors_io as st
from deepseek_jax.hf.mapping import (
    DEFAULT_PARAM_RULES,
    ParamMap,
    mtp_copies,
    mtp_layer_names,
    param_maps,
    partition_spec,
    split_fused_experts,
)

CONFIG_FILE = "config.json"
ORBAX_META_FILE = "deepseek_jax.json"  # our config, written beside orbax's own files
LAYOUT_VERSION = 1


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but something in it was ignored or differs from what we keep."""


# ---- config --------------------------------------------------------------------------------------
def read_hf_config(directory: str) -> tuple[ModelConfig, dict[str, Any], st.Fp8Format | None]:
    """Reads `<directory>/config.json` (hub or `rope_parameters` style).

    Returns:
      (ModelConfig, the raw JSON dict, the FP8 block format or None).
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a hub checkpoint folder)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise st.CheckpointError(f"{path}: invalid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type not in ("deepseek_v2", "deepseek_v3", "llama"):
        raise st.CheckpointError(
            f"{path}: model_type={model_type!r} is unsupported "
            "(allowed: deepseek_v2, deepseek_v3, llama)"
        )
    fp8 = st.Fp8Format.from_config(raw, path)
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise st.CheckpointError(
                f"{path}: {key}=true is unsupported (no DeepSeek release has it)"
            )
    d = dict(raw)
    # Hub V2 configs predate MTP and do not mention it; our default is V3's one module.
    d.setdefault("num_nextn_predict_layers", 0)
    # transformers' DeepseekV2Config leaves the group fields None for greedy routing.
    for key in ("n_group", "topk_group"):
        if key in d and d[key] is None:
            d[key] = 1
    if model_type == "deepseek_v2" and d.get("rope_interleave") is False:
        # V2 rotates adjacent pairs (complex freqs_cis) whatever the flag says.
        warnings.warn(
            f"{path}: rope_interleave=false ignored for deepseek_v2",
            CheckpointWarning,
            stacklevel=2,
        )
        d["rope_interleave"] = True
    return ModelConfig.from_dict(d, source=path), raw, fp8


# ---- validation ----------------------------------------------------------------------------------
@dataclasses.dataclass
class HFSource:
    """A validated hub checkpoint: config, tensor index and the map onto our parameters."""

    directory: str
    cfg: ModelConfig
    raw_config: dict[str, Any]
    fp8: st.Fp8Format | None
    ckpt: st.HubCheckpoint
    maps: list[ParamMap]
    copies: dict[str, str]  # redundant hub tensor -> the main tensor it should equal

    def read(self, name: str, dtype, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Hub tensor `name` (rows r0:r1) as `dtype`, FP8 dequantized."""
        block = self.fp8.block if self.fp8 else None
        return self.ckpt.read(name, np.dtype(dtype), rows, block)

    def stored_dtype(self, pm: ParamMap) -> np.dtype:
        """The dtype a parameter is stored in (FP8 pieces count as bfloat16, their usual
        dequantized form; mixed pieces promote)."""
        if pm.fp32:
            return np.dtype(np.float32)
        codes = {self.ckpt[name].dtype for _, name in pm.pieces()}
        dtypes = [st.DTYPES["BF16" if c == st.FP8_CODE else c] for c in codes]
        return dtypes[0] if len(dtypes) == 1 else np.dtype(np.float32)

    def read_param(self, pm: ParamMap, dtype) -> np.ndarray:
        """Assembles one of our parameters [*stack, *piece] in `dtype`."""
        dtype = np.float32 if pm.fp32 else dtype
        out = np.empty(pm.shape, dtype)
        for index, name in pm.pieces():
            out[index] = pm.to_ours(self.read(name, dtype))
        return out


def open_hf(directory: str | os.PathLike) -> HFSource:
    """Reads config and all safetensors headers and validates them against our model.

    A checkpoint without any MTP tensor although its config asks for MTP modules (what
    transformers' `save_pretrained` writes, since it drops layer `num_hidden_layers`) loads
    without MTP, with a warning.

    Raises:
      CheckpointError: naming each missing/unexpected tensor, wrong shape or dtype and its file.
    """
    directory = os.fspath(directory)
    cfg, raw, fp8 = read_hf_config(directory)
    ckpt = st.HubCheckpoint(directory)
    ckpt.tensors = split_fused_experts(ckpt.tensors)
    if cfg.num_nextn_predict_layers:
        wanted = [n for pm in param_maps(cfg) for _, n in pm.pieces()]
        if not any(n in ckpt for n in mtp_layer_names(cfg, wanted)):
            warnings.warn(
                f"{directory}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers}"
                " but the checkpoint has no MTP tensors; loading without MTP",
                CheckpointWarning,
                stacklevel=2,
            )
            cfg = cfg.replace(num_nextn_predict_layers=0)
    maps = param_maps(cfg)
    copies = mtp_copies(cfg)
    if cfg.tie_word_embeddings:
        copies["lm_head.weight"] = "model.embed_tokens.weight"
    _validate(directory, cfg, fp8, ckpt, maps, copies)
    return HFSource(directory, cfg, raw, fp8, ckpt, maps, copies)


def _validate(directory, cfg, fp8, ckpt, maps, copies) -> None:
    V, D = cfg.vocab_size, cfg.hidden_size
    expected: dict[str, tuple[tuple[int, ...], ParamMap | None]] = {}
    for pm in maps:
        for _, name in pm.pieces():
            expected[name] = (pm.hub_shape, pm)
    for name in copies:
        expected[name] = ((V, D), None)
    problems = []
    for name, info in ckpt.tensors.items():
        where = f"tensor {name!r} in {info.file}"
        if name.endswith(st.SCALE_SUFFIX):
            base = name[: -len(st.SCALE_SUFFIX)]
            if base not in ckpt or ckpt[base].dtype != st.FP8_CODE:
                problems.append(f"{where}: a scale without an FP8 weight {base!r}")
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some exporters keep; recomputed from the config
        if name not in expected:
            problems.append(f"unexpected {where}")
            continue
        shape, pm = expected[name]
        if info.shape != shape:
            problems.append(f"{where} has shape {list(info.shape)}, expected {list(shape)}")
        elif info.dtype == st.FP8_CODE:
            problems += _check_fp8(ckpt, info, fp8, pm, where)
        elif info.dtype not in st.FLOAT_CODES:
            problems.append(f"{where} has dtype {info.dtype}, expected one of {st.FLOAT_CODES}")
    missing = [n for n in expected if n not in ckpt and n not in copies]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.insert(0, f"missing tensor(s) {shown}{more} (not in any shard)")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise st.CheckpointError(
            f"{directory}: checkpoint does not match config.json:\n  {shown}{more}"
        )


def _check_fp8(ckpt, info, fp8, pm, where) -> list[str]:
    if fp8 is None:
        return [f"{where} is {st.FP8_CODE} but config.json has no quantization_config"]
    if pm is None or pm.fp32 or len(info.shape) != 2:
        return [f"{where} is {st.FP8_CODE}; only 2-D weights may be FP8"]
    scale = ckpt.tensors.get(info.name + st.SCALE_SUFFIX)
    if scale is None:
        return [f"{where} is {st.FP8_CODE} but {info.name + st.SCALE_SUFFIX!r} is missing"]
    want = fp8.scale_shape(info.shape)
    if scale.shape != want or scale.dtype not in ("F32", "BF16"):
        return [
            f"tensor {scale.name!r} in {scale.file} is {scale.dtype}{list(scale.shape)}, "
            f"expected F32{list(want)} for blocks of {list(fp8.block)}"
        ]
    return []


def check_mtp_copies(src: HFSource, block_rows: int = 8192) -> list[str]:
    """Compares each MTP embedding/head copy with the main tensor (streamed in row blocks).

    Our model shares the main embedding and head with the MTP modules; a differing copy is
    reported (CheckpointWarning) and ignored. Returns the names that differ.
    """
    differ = []
    for name, main in src.copies.items():
        if name not in src.ckpt:
            continue
        rows = src.ckpt[name].shape[0]
        for r0 in range(0, rows, block_rows):
            r = (r0, min(rows, r0 + block_rows))
            if not np.array_equal(src.read(name, np.float32, r), src.read(main, np.float32, r)):
                differ.append(name)
                warnings.warn(
                    f"{src.ckpt[name].file}: {name!r} differs from {main!r}; our MTP shares the "
                    f"main one, so {name!r} is ignored",
                    CheckpointWarning,
                    stacklevel=3,
                )
                break
    return differ


def logical_axes(var) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (None for the routing bias)."""
    return var.get_metadata().get("logical_axes")


# ---- building the model --------------------------------------------------------------------------
def _with_dtypes(cfg: ModelConfig, dtype, param_dtype) -> ModelConfig:
    name = jnp.dtype(jnp.float32 if dtype is None else dtype).name
    pname = jnp.dtype(param_dtype).name if param_dtype is not None else name
    return cfg.replace(dtype=name, param_dtype=pname)


def abstract_state(cfg: ModelConfig):
    """(graphdef, state of ShapeDtypeStructs) of DeepSeekModel(cfg), with no memory allocated."""
    from deepseek_jax.model import DeepSeekModel

    abstract = nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _sharding_fn(mesh: Mesh | None, rules: Mapping[str, Any] | None):
    if mesh is None:
        device = jax.devices()[0]
        return lambda path, var: jax.sharding.SingleDeviceSharding(device)
    rules = DEFAULT_PARAM_RULES if rules is None else rules

    def fn(path, var):
        spec = partition_spec(logical_axes(var), var.shape, dict(mesh.shape), rules, path)
        return NamedSharding(mesh, spec)

    return fn


def _merge(graphdef, state, values: dict[tuple[str, ...], Any], fp8=None):
    """The model from `values` by path; `fp8` paths become Fp8Params (FP8 serving weights)."""
    fp8 = fp8 or {}
    paths = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}
    given = set(values) | set(fp8)
    if paths != given:
        raise RuntimeError(
            f"parameter maps do not cover the model: missing {sorted(paths - given)[:3]}, "
            f"extra {sorted(given - paths)[:3]}"
        )
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    model = nnx.merge(graphdef, state)
    fp8_params.install(model, fp8)
    return model


def load_hf(
    directory: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    weights: str = "dense",
):
    """Loads a hub checkpoint folder into a DeepSeekModel (see `load_pretrained`)."""
    fp8_params.check_mode(weights)
    src = open_hf(directory)
    cfg = _with_dtypes(src.cfg, dtype, param_dtype)
    block = None
    if weights != "dense":
        block = fp8_params.serving_block(src.directory, src.fp8, weights)
        if mesh is not None:
            raise ValueError(f"load_pretrained: {weights=} is not supported with a mesh yet")
    check_mtp_copies(src)
    graphdef, state = abstract_state(cfg)
    variables = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}
    sharding = _sharding_fn(mesh, rules)
    values, fp8 = {}, {}
    for pm in src.maps:
        if block is not None and pm.quantizable:
            quantize = weights == "quantize_fp8"
            fp8[pm.path] = fp8_params.read_fp8_param(src, pm, block, quantize=quantize)
            continue
        arr = src.read_param(pm, cfg.weight_dtype)
        var = variables.get(pm.path)
        if var is None:
            raise RuntimeError(f"parameter map {pm.name} has no model variable")
        target = sharding(pm.name, var)
        values[pm.path] = jax.make_array_from_callback(arr.shape, target, lambda i, a=arr: a[i])
        del arr
    return _merge(graphdef, state, values, fp8)


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


def load_pretrained(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    config: ModelConfig | None = None,
    weights: str = "dense",
):
    """Loads a DeepSeek-V2/V2-Lite/V3/R1, DeepSeek LLM or DeepSeekMath model.

    Args:
      path: a hub checkpoint folder (config.json + model.safetensors, or shards with
        model.safetensors.index.json; BF16/FP32, or FP8 with `weight_scale_inv`), or an Orbax
        checkpoint written by `python -m deepseek_jax.convert hf-to-orbax`.
      dtype: compute dtype (jnp.float32 or jnp.bfloat16).
      param_dtype: dtype of the weights in memory (default: `dtype`); the routing selection
        bias always stays float32.
      mesh: shard the weights over this mesh (default: all on the first device).
      rules: logical axis -> mesh axes for the weights (default DEFAULT_PARAM_RULES).
      config: the ModelConfig of an Orbax checkpoint that lacks our deepseek_jax.json.
      weights: "dense" (default), "fp8" (serve a hub FP8 checkpoint's linear weights as stored,
        E4M3 + block scales, through the FP8 kernels) or "quantize_fp8" (also quantize BF16/FP32
        linear weights on load); see deepseek_jax/hf/fp8_params.py.
    Returns:
      A `DeepSeekModel` holding the checkpoint's weights.
    """
    path = os.fspath(path)
    fp8_params.check_mode(weights)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if is_orbax_checkpoint(path):
        if weights != "dense":
            raise ValueError(
                f"load_pretrained: {weights=} needs a hub checkpoint folder; {path} is an Orbax "
                "checkpoint (its weights are dense)"
            )
        return load_orbax(
            path, dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, config=config
        )
    return load_hf(path, dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, weights=weights)
