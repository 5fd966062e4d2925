"""Hugging Face interop: hub safetensors checkpoints (BF16/FP32 and DeepSeek's block FP8) in and
out, and the name/layout mapping between the hub and our stacked parameter tree.

Conversion to and from Orbax lives in `deepseek_jax.convert` (`python -m deepseek_jax.convert`),
the Orbax layout in `deepseek_jax.orbax_layout`. Nothing here imports torch or transformers.
`load_pretrained` (hub folder or Orbax checkpoint) lives in `deepseek_jax.pretrained` and is
re-exported here on first use: that module imports this package, so importing it here would make
a cycle.
"""

from deepseek_jax.hf.load import (
    CheckpointWarning,
    HFSource,
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


def __getattr__(name):
    if name == "load_pretrained":
        from deepseek_jax.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
