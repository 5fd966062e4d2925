"""Training FLOPs per token of a DeepSeek-V2/V3 model and model FLOPs utilisation (MFU).

Convention: a matmul of an [M, K] activation with a [K, N] weight costs 2 M K N FLOPs forward and
twice that backward (input and weight gradients), so each weight used by a token costs 6 FLOPs
per training token. Element-wise work (norms, activations, softmax, RoPE, routing top-k) and the
embedding lookup (a gather) are not counted; the output head is.

Per token, with dimension letters of DESIGN.md (d_qk = qk_nope + R, d_v = v_head_dim):

  weights used (P_tok):
    MLA, per layer:  D Q + Q N d_qk          (query: down, up incl. the rope part; or D N d_qk)
                     + D (C + R)             (joint KV down-projection and shared rope key)
                     + C N (qk_nope + d_v)   (K/V up-projection: the training path expands K/V)
                     + N d_v D               (output)
    dense FFN layer: 3 D F
    MoE layer:       D E (router) + (K + n_shared) 3 D F_moe   (only the K routed experts run)
    output head:     D V
    MTP depth:       2 D D (eh_proj) + one MLA + one FFN/MoE layer + D V (shared head, run again)

  attention core, per layer and token, over S keys: q.k costs 2 N S d_qk and p.v 2 N S d_v
  forward, so 6 N S (d_qk + d_v) for training. Averaged over a causal row of T queries,
  S = T / 2 (we count causal attention, *halved*):

    F_attn = 3 N T (d_qk + d_v)  per layer; the non-causal (PaLM-style) count is twice this,
                                 6 N T (d_qk + d_v) = 12 N T (d_qk + d_v) / 2

  FLOPs/token = 6 P_tok + (L + n_mtp) F_attn

Our MLA materialises the full [T, T] score matrix and masks it, so the hardware executes twice
the counted attention-core FLOPs: MFU measures useful work. For DeepSeek-V3 at T = 4096 this
gives 250 GFLOPs/token without MTP (the figure DeepSeek quotes) and 261 GFLOPs/token with it.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices), with the dense BF16 peak of the
device from `PEAK_FLOPS` (FP8 runs are still measured against the BF16 peak). CPUs have no
meaningful table entry: pass `peak` (train.peak_flops) or get `CPU_PEAK_FLOPS`, 1e11 FLOP/s per
device (about one AVX2 core: 2 FMA units x 8 fp32 lanes x 2 FLOPs x 3 GHz).
"""

from __future__ import annotations

import dataclasses

import jax

from deepseek_jax.config import ModelConfig

# Dense (no sparsity) BF16 peak FLOP/s per device, matched against `device_kind` (lower case) in
# order: the first substring that occurs wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("h800", 989e12),
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
)
CPU_PEAK_FLOPS = 1e11


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token, split into their terms (see the module docstring)."""

    weights_main: int  # P_tok of the main model (layers + head)
    weights_mtp: int  # P_tok of the MTP modules
    attention: int  # (L + n_mtp) * F_attn

    @property
    def total(self) -> int:
        return 6 * (self.weights_main + self.weights_mtp) + self.attention


def mla_weights(cfg: ModelConfig) -> int:
    """Weights of one MLA layer that every token multiplies."""
    D, N, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = D * N * d_qk
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * N * d_qk
    return q + D * (C + R) + C * N * (cfg.qk_nope_head_dim + d_v) + N * d_v * D


def attention_weights(cfg: ModelConfig) -> int:
    """Weights of one attention layer: MLA's, or standard MHA/GQA's D (N + 2 N_kv) H + N H D."""
    if cfg.attention_type == "mla":
        return mla_weights(cfg)
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
    return D * (N + 2 * K) * H + N * H * D


def ffn_weights(cfg: ModelConfig, moe: bool) -> int:
    """Weights of one dense FFN or the activated part of one MoE layer."""
    D = cfg.hidden_size
    if not moe:
        return 3 * D * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts
    return D * cfg.n_routed_experts + experts * 3 * D * cfg.moe_intermediate_size


def attention_core(cfg: ModelConfig, seq_len: int, causal: bool = True) -> int:
    """Training FLOPs of q.k and p.v for one token in one layer (halved when causal)."""
    d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    if cfg.attention_type == "mha":
        d_qk = d_v = cfg.attn_head_dim
    full = 6 * cfg.num_attention_heads * seq_len * (d_qk + d_v)
    return full // 2 if causal else full


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, causal: bool = True, include_mtp: bool = True
) -> FlopsPerToken:
    """Training FLOPs per token (forward + backward) of `cfg` at row length `seq_len`.

    Args:
      cfg: the architecture.
      seq_len: T, the packed row length (attention spans the row; packing masks make the true
        attention work smaller, which this count ignores).
      causal: count only the causal half of the attention core.
      include_mtp: count the MTP modules (they run in every training step).
    Returns:
      FlopsPerToken; `.total` is the number.
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    main = (
        cfg.num_hidden_layers * attention_weights(cfg)
        + cfg.num_dense_layers * ffn_weights(cfg, moe=False)
        + cfg.num_moe_layers * ffn_weights(cfg, moe=cfg.is_moe)
        + D * V
    )
    n_mtp = cfg.num_nextn_predict_layers if include_mtp else 0
    mtp = n_mtp * (2 * D * D + attention_weights(cfg) + ffn_weights(cfg, moe=cfg.is_moe) + D * V)
    attn = (cfg.num_hidden_layers + n_mtp) * attention_core(cfg, seq_len, causal)
    return FlopsPerToken(weights_main=main, weights_mtp=mtp, attention=attn)


def peak_flops(device: jax.Device | None = None, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override`, else the table, else CPU_PEAK_FLOPS on CPU.

    Raises:
      ValueError: an accelerator missing from the table and no override (names the device).
    """
    if override is not None:
        return float(override)
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return CPU_PEAK_FLOPS
    kind = device.device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    raise ValueError(
        f"no peak FLOP/s known for device kind {device.device_kind!r}; set train.peak_flops "
        f"(known: {[k for k, _ in PEAK_FLOPS]})"
    )


def mfu(tokens_per_s: float, flops_token: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs/token / (devices x peak FLOP/s per device)."""
    return tokens_per_s * flops_token / (num_devices * peak)
