"""Loading a DeepSeek model from a hub checkpoint folder (`load_hf`).

Hub folders: DeepSeek-V2/V3 (`deepseek_v2`, `deepseek_v3`) and DeepSeek LLM / DeepSeekMath, whose
checkpoints are `LlamaForCausalLM` (`llama`: standard attention, dense FFN in every layer).

A hub folder is opened in two steps. `open_hf` reads config.json and every safetensors header
(cheap: a few KB per shard) and checks them against `mapping.param_maps(cfg)`: each missing,
unexpected, wrongly shaped or wrongly typed tensor is reported with its name and file before a
single weight is read. Then each parameter is assembled piece by piece (FP8 blocks dequantized
on the CPU) and placed on its device(s). Our Orbax checkpoints are read and written by
`deepseek_jax.orbax_layout`; `deepseek_jax.pretrained.load_pretrained` picks between the two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf import fp8_params
from deepseek_jax.hf import safetensors_io as st
from deepseek_jax.hf.mapping import (
    ParamMap,
    mtp_copies,
    mtp_layer_names,
    param_maps,
    split_fused_experts,
)
from deepseek_jax.restore import _merge, _sharding_fn, _with_dtypes, abstract_state

CONFIG_FILE = "config.json"


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


# ---- building the model --------------------------------------------------------------------------
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
