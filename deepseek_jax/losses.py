"""Training objectives: next-token CE, MTP loss, MoE balance losses and z-loss.

Balance losses are computed from `MoEStats` (per-layer, per-sequence counts and affinity sums):
  * V3 complementary sequence-wise loss (V3 eq. 17-20):
      f_i = E / (K T) * sum_t 1[i in topk(t)],  P_i = 1/T * sum_t s'_{i,t},
      L_bal = alpha * sum_i f_i P_i, averaged over sequences (and summed over layers).
  * V2 expert-level (eq. 12-14): the same with alpha_1; like DeepSeek's code with the shipped
      `seq_aux: true` (ModelConfig.seq_aux), f_i and P_i are per sequence and the loss is
      averaged over sequences; seq_aux false takes them over the whole batch.
  * V2 device-level (eq. 15-17): experts partitioned into D groups ("devices"),
      f'_d = mean_{i in d} f_i,  P'_d = sum_{i in d} P_i,  L = alpha_2 * sum_d f'_d P'_d.
  * V2 communication (eq. 18-20): f''_d = D / (M T) * sum_t 1[token t sent to device d],
      P''_d = sum_{i in d} P_i,  L = alpha_3 * sum_d f''_d P''_d  (M = topk_group).
Device and communication losses follow seq_aux the same way. Sequences with no counted token
(all-padding rows) are left out of every per-sequence mean.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.moe import MoEStats


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the auxiliary objectives (0 disables a term)."""

    mtp_lambda: float = 0.3  # V3: 0.3 for the first 10T tokens, then 0.1
    seq_balance_alpha: float = 1e-4  # V3 complementary sequence-wise loss
    expert_balance_alpha: float = 0.0  # V2 alpha_1 (0.003 in V2)
    device_balance_alpha: float = 0.0  # V2 alpha_2 (0.05)
    comm_balance_alpha: float = 0.0  # V2 alpha_3 (0.02)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2)
    # MTP self-distillation: the target of depth k at position i mixes the data token t_{i+k+1}
    # (weight 1 - mtp_distill) with the main model's own distribution at position i+k (the one
    # speculative decoding verifies against; no gradient into the main model through it).
    mtp_distill: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"LossConfig.{f.name}={getattr(self, f.name)} must be finite")
            if getattr(self, f.name) < 0:
                raise ValueError(f"LossConfig.{f.name}={getattr(self, f.name)} must be >= 0")
        if self.mtp_distill > 1:
            raise ValueError(f"LossConfig.mtp_distill={self.mtp_distill} must be in [0, 1]")


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
    """Mean token cross entropy.

    Args:
      logits: [B, T, V]; labels: [B, T] int; mask: [B, T] (1 = counted) or None.
    Returns:
      (mean loss over counted tokens, number of counted tokens, mean logsumexp^2 for z-loss).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    return ((lse - picked) * mask).sum() / n, mask.sum(), (lse**2 * mask).sum() / n


def mtp_targets(labels, mask, segment_ids, depth: int):
    """Labels and mask for MTP depth k (1-based): position i predicts t_{i+k+1} = labels[i+k].

    Valid only where labels[i+k] is counted and i+k lies in the same packed document as i.
    """
    B, T = labels.shape
    pad = jnp.zeros((B, depth), labels.dtype)
    shifted = jnp.concatenate([labels[:, depth:], pad], axis=1)
    m = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    shifted_m = jnp.concatenate([m[:, depth:], jnp.zeros((B, depth), m.dtype)], axis=1)
    if segment_ids is not None:
        seg_next = jnp.concatenate(
            [segment_ids[:, depth:], jnp.zeros((B, depth), segment_ids.dtype)], 1
        )
        shifted_m = shifted_m * (seg_next == segment_ids)
    return shifted, shifted_m * m


def _distill(logits, mtp_logits, mask, depth: int) -> jax.Array:
    """Mean over counted positions i of CE(p_main(. | t_<=i+depth), q_mtp(. | position i)).

    logits, mtp_logits [B, T, V]; mask [B, T] from `mtp_targets` (0 where i+depth is invalid).
    """
    teacher = jax.lax.stop_gradient(jax.nn.softmax(logits[:, depth:].astype(jnp.float32), -1))
    logq = jax.nn.log_softmax(mtp_logits[:, :-depth].astype(jnp.float32), -1)
    ce = -(teacher * logq).sum(-1)  # [B, T - depth]
    m = mask[:, :-depth].astype(jnp.float32)
    return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


def _over_sequences(value: jax.Array, tokens: jax.Array) -> jax.Array:
    """value [L, B] per layer and sequence -> sum over layers of the mean over sequences.

    Sequences without a counted token (all-padding rows, e.g. a padded final batch) are left out
    of the mean instead of diluting it with zeros.
    """
    valid = (tokens > 0).astype(jnp.float32)  # [L, B]
    per_layer = (value * valid).sum(-1) / jnp.maximum(valid.sum(-1), 1.0)  # [L]
    return per_layer.sum()


def seq_balance_loss(stats: MoEStats, cfg: ModelConfig) -> jax.Array:
    """V3 complementary sequence-wise balance loss sum_i f_i P_i, per layer, mean over sequences.

    Returns the sum over layers (unweighted: multiply by alpha).
    """
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    T = jnp.maximum(stats.tokens, 1.0)[..., None]  # [L, B, 1]
    f = stats.expert_counts * E / (K * T)  # [L, B, E]
    P = stats.score_sums / T
    return _over_sequences((f * P).sum(-1), stats.tokens)


def _fp(stats: MoEStats, cfg: ModelConfig):
    """V2 eq. 13-14: f, P [L, S, E], group counts [L, S, G], T [L, S, 1], tokens [L, S].

    `cfg.seq_aux` (DeepSeek's shipped V2 configs: true) computes them per sequence (S = B), as
    DeepSeek's MoEGate does; otherwise over the whole batch (S = 1).
    """
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    counts, sums, groups, tokens = (
        stats.expert_counts,
        stats.score_sums,
        stats.group_counts,
        stats.tokens,
    )
    if not cfg.seq_aux:
        counts, sums, groups, tokens = (
            a.sum(1, keepdims=True) for a in (counts, sums, groups, tokens)
        )
    T = jnp.maximum(tokens, 1.0)[..., None]  # [L, S, 1]
    return counts * E / (K * T), sums / T, groups, T, tokens


def expert_balance_loss(stats: MoEStats, cfg: ModelConfig) -> jax.Array:
    """V2 expert-level balance loss (eq. 12-14), per sequence if cfg.seq_aux; summed over layers."""
    f, P, _, _, tokens = _fp(stats, cfg)
    return _over_sequences((f * P).sum(-1), tokens)


def device_balance_loss(stats: MoEStats, cfg: ModelConfig) -> jax.Array:
    """V2 device-level balance loss (eq. 15-17) with the n_group expert groups as devices."""
    f, P, _, _, tokens = _fp(stats, cfg)
    G = cfg.n_group
    f_dev = f.reshape(f.shape[:2] + (G, -1)).mean(-1)  # [L, S, G]
    P_dev = P.reshape(P.shape[:2] + (G, -1)).sum(-1)
    return _over_sequences((f_dev * P_dev).sum(-1), tokens)


def comm_balance_loss(stats: MoEStats, cfg: ModelConfig) -> jax.Array:
    """V2 communication balance loss (eq. 18-20): tokens sent to each device group."""
    f, P, groups, T, tokens = _fp(stats, cfg)
    G, M = cfg.n_group, cfg.topk_group
    f_comm = groups * G / (M * T)  # [L, S, G]
    P_dev = P.reshape(P.shape[:2] + (G, -1)).sum(-1)
    return _over_sequences((f_comm * P_dev).sum(-1), tokens)


def lm_loss(out, batch: dict, lcfg: LossConfig, mtp_lambda=None):
    """L_main + lambda/D * sum_k L_MTP^k + z-loss (no balance terms).

    Args:
      out: ModelOutput (its moe_stats are not used here).
      batch: dict with `labels` [B, T], optional `loss_mask`, `segment_ids`.
      mtp_lambda: overrides lcfg.mtp_lambda (for a schedule); may be a traced scalar.
    Returns:
      (scalar loss, dict of metrics).
    """
    labels, mask, seg = batch["labels"], batch.get("loss_mask"), batch.get("segment_ids")
    main, ntok, z = cross_entropy(out.logits, labels, mask)
    loss = main + lcfg.z_loss * z
    metrics = {"main_loss": main, "tokens": ntok, "z_loss": z}
    lam = lcfg.mtp_lambda if mtp_lambda is None else mtp_lambda
    if out.mtp_logits is not None:
        depth = out.mtp_logits.shape[0]
        mtp = 0.0
        for k in range(depth):
            lab_k, mask_k = mtp_targets(labels, mask, seg, k + 1)
            mtp_k = cross_entropy(out.mtp_logits[k], lab_k, mask_k)[0]
            if lcfg.mtp_distill > 0:
                w = lcfg.mtp_distill
                mtp_k = (1 - w) * mtp_k + w * _distill(out.logits, out.mtp_logits[k], mask_k, k + 1)
            mtp = mtp + mtp_k
        mtp = mtp / depth
        loss = loss + lam * mtp
        metrics["mtp_loss"] = mtp
    return loss, metrics


def balance_loss(stats: MoEStats | None, cfg: ModelConfig, lcfg: LossConfig):
    """The weighted MoE balance terms for the layers in `stats` -> (scalar, metrics)."""
    loss, metrics = jnp.zeros((), jnp.float32), {}
    if stats is None:
        return loss, metrics
    terms = {
        "seq_balance_loss": (lcfg.seq_balance_alpha, seq_balance_loss),
        "expert_balance_loss": (lcfg.expert_balance_alpha, expert_balance_loss),
        "device_balance_loss": (lcfg.device_balance_alpha, device_balance_loss),
        "comm_balance_loss": (lcfg.comm_balance_alpha, comm_balance_loss),
    }
    for name, (alpha, fn) in terms.items():
        if alpha:
            value = fn(stats, cfg)
            loss = loss + alpha * value
            metrics[name] = value
    return loss, metrics


def total_loss(out, batch: dict, cfg: ModelConfig, lcfg: LossConfig, mtp_lambda=None):
    """L = L_main + lambda/D * sum_k L_MTP^k + balance terms + z-loss -> (loss, metrics)."""
    loss, metrics = lm_loss(out, batch, lcfg, mtp_lambda)
    bal, bal_metrics = balance_loss(out.moe_stats, cfg, lcfg)
    metrics.update(bal_metrics)
    metrics["loss"] = loss + bal
    return loss + bal, metrics
