"""deepseek-jax: DeepSeek-V2/V3 (MLA, DeepSeekMoE, MTP, FP8) and its training system in JAX."""

from deepseek_jax.config import ModelConfig, RopeScaling, load_preset
from deepseek_jax.inference.engine import GenerationResult, generate, generate_stream
from deepseek_jax.model import DeepSeekModel, ModelOutput
from deepseek_jax.params import count_params
from deepseek_jax.sharding.parallel import ParallelConfig

__all__ = [
    "DeepSeekModel",
    "GenerationResult",
    "ModelConfig",
    "ModelOutput",
    "ParallelConfig",
    "RopeScaling",
    "count_params",
    "generate",
    "generate_stream",
    "load_preset",
    "load_pretrained",
]


def load_pretrained(path, dtype=None, **kwargs):
    """Loads an HF checkpoint folder (BF16/FP32 or FP8) or an Orbax checkpoint of this project.

    See `deepseek_jax.pretrained.load_pretrained` for the keyword arguments (mesh, rules,
    param_dtype, weights="fp8" to serve an FP8 hub checkpoint with its weights kept in FP8).
    """
    from deepseek_jax.pretrained import load_pretrained as _load

    return _load(path, **kwargs) if dtype is None else _load(path, dtype=dtype, **kwargs)
