"""Inference: the generation engine over the latent cache, sampling, text helpers and the CLI."""

from deepseek_jax.inference.engine import (
    GenerationResult,
    StreamChunk,
    generate,
    generate_stream,
)
from deepseek_jax.inference.sampling import sample

__all__ = ["GenerationResult", "StreamChunk", "generate", "generate_stream", "sample"]
