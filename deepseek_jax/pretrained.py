"""`load_pretrained`: a DeepSeek model from a hub checkpoint folder (`deepseek_jax.hf`) or our
Orbax checkpoint (`deepseek_jax.orbax_layout`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf import fp8_params
from deepseek_jax.hf.load import load_hf
from deepseek_jax.orbax_layout import is_orbax_checkpoint, load_orbax


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
