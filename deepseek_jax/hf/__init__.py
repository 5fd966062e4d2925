"""Hugging Face interop: hub safetensors checkpoints (BF16/FP32 and DeepSeek's block FP8) in and
out, and the name/layout mapping between the hub and our stacked parameter tree.

Conversion to and from Orbax lives in `deepseek_jax.convert` (`python -m deepseek_jax.convert`).
Nothing here imports torch or transformers.
"""

from deepseek_jax.hf.load import (
    CheckpointWarning,
    HFSource,
    load_pretrained,
    open_hf,
    read_hf_config,
)
from deepseek_jax.hf.mapping import DEFAULT_PARAM_RULES, ParamMap, mtp_copies, param_maps
from deepseek_jax.hf.safetensors_io import CheckpointError, Fp8Format, HubCheckpoint

__all__ = [
    "DEFAULT_PARAM_RULES",
    "CheckpointError",
    "CheckpointWarning",
    "Fp8Format",
    "HFSource",
    "HubCheckpoint",
    "ParamMap",
    "load_pretrained",
    "mtp_copies",
    "open_hf",
    "param_maps",
    "read_hf_config",
]
