"""FP8 serving parameters from a hub checkpoint: `load_pretrained(path, weights="fp8")`.

DeepSeek-V3/R1 store each decoder linear weight as float8_e4m3fn [out, in] with a
`weight_scale_inv` [ceil(out/b), ceil(in/b)] per b x b block. Our layout multiplies x @ W with
W = hub.T (reshaped to explicit head axes), and transposing a block-quantized matrix only
transposes its scale grid, so the stored bytes are kept as they are: data = hub_fp8.T reshaped
like the dense parameter, scale = scale_inv.T ([Kb, Nb] of the [K, N] view). Nothing is
dequantized or re-rounded.

Modes (`WEIGHT_MODES`):
  "dense"        every weight in param_dtype; FP8 blocks dequantized (the default).
  "fp8"          the linear weights (`ParamMap.quantizable`) stay in the checkpoint's FP8 blocks;
                 a linear weight stored in BF16/FP32, or a checkpoint without FP8, is an error.
  "quantize_fp8" as "fp8", but linear weights stored in BF16/FP32 are quantized on load into
                 the checkpoint's blocks (128 x 128 when it has none): an explicit, lossy choice.
Embedding, output head, norms, the gate and the MTP projection stay in param_dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.fp8_weights import Fp8Param, Fp8Weight
from deepseek_jax.hf import safetensors_io as st
from deepseek_jax.hf.mapping import ParamMap

WEIGHT_MODES = ("dense", "fp8", "quantize_fp8")
DEFAULT_BLOCK = 128  # V3's block, used by "quantize_fp8" when the checkpoint has no FP8


def check_mode(weights: str) -> None:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"load_pretrained: {weights=} must be one of {WEIGHT_MODES}")


def serving_block(directory: str, fp8: st.Fp8Format | None, weights: str) -> int:
    """The block edge of the FP8 serving weights, after checking the mode can be honoured."""
    if fp8 is None:
        if weights == "fp8":
            raise st.CheckpointError(
                f"{directory}: weights='fp8' keeps a checkpoint's FP8 weights, but its "
                "config.json has no quantization_config (a BF16/FP32 checkpoint); pass "
                "weights='quantize_fp8' to quantize the linear weights to 128x128 FP8 blocks on "
                "load, or weights='dense'"
            )
        return DEFAULT_BLOCK
    b0, b1 = fp8.block
    if b0 != b1 or b0 & (b0 - 1):
        raise st.CheckpointError(
            f"{directory}: quantization_config.weight_block_size={list(fp8.block)} cannot be "
            "served in FP8: the FP8 kernels take square power-of-two blocks; load with "
            "weights='dense'"
        )
    return b0


def contracted_dims(pm: ParamMap) -> int:
    """How many leading piece axes form the hub tensor's input dimension (K)."""
    k = pm.hub_shape[1]
    for d in range(1, len(pm.piece_shape)):
        if math.prod(pm.piece_shape[:d]) == k:
            return d
    raise RuntimeError(f"{pm.name}: piece {pm.piece_shape} has no input axes of size {k}")


def read_fp8_param(src, pm: ParamMap, block: int, *, quantize: bool) -> Fp8Weight:
    """Assembles one linear parameter [*stack, *piece] as stored FP8 data and block scales.

    Args:
      src: the opened hub checkpoint (`load.HFSource`).
      pm: a quantizable parameter map (hub pieces [out, in]).
      block: block edge (the checkpoint's, or DEFAULT_BLOCK when quantizing).
      quantize: quantize pieces stored in BF16/FP32 instead of raising.
    """
    out_f, in_f = pm.hub_shape
    grid = (-(-in_f // block), -(-out_f // block))  # [Kb, Nb] of our [K, N] = hub.T
    data = np.empty(pm.shape, st.DTYPES[st.FP8_CODE])
    scale = np.empty(pm.stack_shape + grid, np.float32)
    for index, name in pm.pieces():
        info = src.ckpt[name]
        if info.dtype == st.FP8_CODE:
            q = st.read_tensor(info)
            s = st.read_tensor(src.ckpt[name + st.SCALE_SUFFIX]).astype(np.float32)
        elif quantize:
            q, s = st.quantize(src.read(name, np.float32), (block, block))
        else:
            raise st.CheckpointError(
                f"{info.file}: tensor {name!r} is {info.dtype}, not {st.FP8_CODE}; weights='fp8' "
                "serves weights stored in FP8 only (weights='quantize_fp8' quantizes it on load)"
            )
        data[index] = pm.to_ours(q)
        scale[index] = s.T
    return Fp8Weight.create(
        jnp.asarray(data), jnp.asarray(scale), block=block, in_dims=contracted_dims(pm)
    )


def install(model: nnx.Module, weights: dict[tuple[str, ...], Fp8Weight]) -> None:
    """Replaces each parameter at `path` by an Fp8Param holding its Fp8Weight (same metadata)."""
    for path, w in weights.items():
        module = model
        for key in path[:-1]:
            module = getattr(module, key)
        old = getattr(module, path[-1])
        setattr(module, path[-1], Fp8Param(w, **old.get_metadata()))
