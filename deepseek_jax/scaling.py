"""DeepSeek LLM's scaling laws (arXiv 2401.02954, Sec. 3).

Model scale is measured as non-embedding FLOPs per token, not parameters (Sec. 3.2, eq. 2):

    M = 72 n_layer d_model^2 + 12 n_layer d_model l_seq        (vs 6N_1 = 72 n_layer d_model^2)

the training FLOPs of a token in a LLaMA-style layer (4 d^2 attention + 8 d^2 SwiGLU weights,
times 6 for forward + backward, plus the non-causal attention core), without the vocabulary
projection. Compute is C = M D for D training tokens. The fitted laws (Sec. 3.1 eq. 1, Sec. 3.2
eq. 4), with C in FLOPs, B in tokens:

    eta_opt = 0.3118 C^-0.1250          B_opt = 0.2920 C^0.3271
    M_opt   = 0.1715 C^0.5243           D_opt = 5.8316 C^0.4757

Constants checked on 2026-12-02: eta_opt and B_opt as restated by a calculator built on the paper
(codestar12.github.io/llm-hparam-flop-calculator); M_opt and D_opt against each other (C = M D
requires exponents summing to 1 and coefficients multiplying to 1: 0.5243 + 0.4757 = 1 and
0.1715 x 5.8316 = 1.0001). The paper's text itself was not among the sources we could read.
"""

from __future__ import annotations

import dataclasses
import math
import os

from deepseek_jax.config import PRESET_DIR, ModelConfig, load_preset
from deepseek_jax.train.flops import flops_per_token

# (coefficient, exponent) of each law, C in FLOPs.
LR_LAW = (0.3118, -0.1250)
BATCH_LAW = (0.2920, 0.3271)
MODEL_LAW = (0.1715, 0.5243)
DATA_LAW = (5.8316, 0.4757)


def model_scale(n_layer: int, d_model: int, seq_len: int) -> float:
    """M: non-embedding FLOPs per token of a LLaMA-style model (eq. 2)."""
    return 72.0 * n_layer * d_model**2 + 12.0 * n_layer * d_model * seq_len


def model_scale_of(cfg: ModelConfig, seq_len: int) -> float:
    """M of any of our architectures: training FLOPs per token without the vocabulary projection
    (non-causal attention core, as eq. 2 counts it; MoE layers count their activated experts).

    Equals `model_scale` for MHA with a SwiGLU FFN of exactly 8/3 d_model.
    """
    total = flops_per_token(cfg, seq_len, causal=False, include_mtp=False).total
    return float(total - 6 * cfg.hidden_size * cfg.vocab_size)


def _law(law: tuple[float, float], compute: float) -> float:
    if not (isinstance(compute, int | float) and math.isfinite(compute) and compute > 0):
        raise ValueError(f"compute budget C={compute!r} must be a positive, finite FLOP count")
    coefficient, exponent = law
    return coefficient * compute**exponent


def optimal_lr(compute: float) -> float:
    """eta_opt = 0.3118 C^-0.1250 (Sec. 3.1)."""
    return _law(LR_LAW, compute)


def optimal_batch_tokens(compute: float) -> float:
    """B_opt = 0.2920 C^0.3271 tokens per step (Sec. 3.1)."""
    return _law(BATCH_LAW, compute)


def optimal_model_scale(compute: float) -> float:
    """M_opt = 0.1715 C^0.5243 non-embedding FLOPs per token (Sec. 3.2)."""
    return _law(MODEL_LAW, compute)


def optimal_tokens(compute: float) -> float:
    """D_opt = 5.8316 C^0.4757 training tokens (Sec. 3.2)."""
    return _law(DATA_LAW, compute)


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """What the laws recommend for one compute budget, and the preset closest to M_opt."""

    compute: float  # C, FLOPs
    seq_len: int
    model_scale: float  # M_opt, FLOPs/token
    tokens: float  # D_opt
    batch_tokens: float  # B_opt
    lr: float  # eta_opt
    preset: str  # nearest preset by |log M - log M_opt|
    preset_scale: float  # its M at seq_len

    @property
    def batch_sequences(self) -> int:
        return max(1, round(self.batch_tokens / self.seq_len))


def preset_names() -> list[str]:
    """Model presets of configs/ (run configs, train-*.yaml, are not models)."""
    names = (p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
    return sorted(n for n in names if not n.startswith("train-"))


def recommend(compute: float, seq_len: int = 4096) -> Recommendation:
    """The laws at budget `compute` and the preset whose M (at `seq_len`) is closest to M_opt."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    m_opt = optimal_model_scale(compute)
    scales = {n: model_scale_of(load_preset(n), seq_len) for n in preset_names()}
    best = min(scales, key=lambda n: abs(math.log(scales[n] / m_opt)))
    return Recommendation(
        compute=float(compute),
        seq_len=seq_len,
        model_scale=m_opt,
        tokens=optimal_tokens(compute),
        batch_tokens=optimal_batch_tokens(compute),
        lr=optimal_lr(compute),
        preset=best,
        preset_scale=scales[best],
    )


def format_recommendation(r: Recommendation) -> str:
    return "\n".join(
        [
            f"DeepSeek LLM scaling laws (arXiv 2401.02954 Sec. 3) at C = {r.compute:.3e} FLOPs",
            f"  model scale M_opt = 0.1715 C^0.5243  {r.model_scale:.3e} non-embedding FLOPs/token",
            f"  data D_opt = 5.8316 C^0.4757         {r.tokens:.3e} tokens",
            f"  batch B_opt = 0.2920 C^0.3271        {r.batch_tokens:.3e} tokens "
            f"(~{r.batch_sequences} sequences of {r.seq_len})",
            f"  learning rate eta_opt = 0.3118 C^-0.1250  {r.lr:.3e}",
            f"  nearest preset: {r.preset} (M = {r.preset_scale:.3e} at seq {r.seq_len}; "
            f"C / M = {r.compute / r.preset_scale:.3e} tokens)",
        ]
    )


def apply_to_run(run, compute: float):
    """A RunConfig with the laws' learning rate, batch and steps for budget `compute`.

    train.lr = eta_opt(C); data.global_batch_size = B_opt(C) / seq_len rows (rounded, a multiple
    of the micro-batch count); train.steps = (C / M) / tokens per step, with M the model's
    `model_scale_of` at data.seq_len.
    """
    T = run.data.seq_len
    multiple = math.lcm(
        run.train.grad_accum, run.pipeline.microbatches if run.mesh.stage > 1 else 1
    )
    rows = max(multiple, round(optimal_batch_tokens(compute) / T / multiple) * multiple)
    tokens = compute / model_scale_of(run.model, T)
    steps = max(1, round(tokens / (rows * T)))
    train = dataclasses.replace(run.train, lr=optimal_lr(compute), steps=steps)
    data = dataclasses.replace(run.data, global_batch_size=rows)
    return dataclasses.replace(run, train=train, data=data)
