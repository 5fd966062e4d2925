"""Post-training objectives `(model, batch) -> (loss, (metrics, moe_stats))`: SFT, DPO and GRPO.

Each objective is a pure function of an NNX model and a batch dict of arrays, so the one train step
(accumulation, sharding, non-finite skipping, optimizer, routing-bias update) can run any of them;
hyper-parameters are keyword arguments bound with `functools.partial`, e.g.
`functools.partial(grpo_objective, beta=0.04, loss_type="dapo")`.

The aux output is `(metrics, moe_stats)`: a dict of scalar metrics (always with `tokens`, the
number of tokens in the loss, which the step uses to weight micro-batches) and the `MoEStats` of
the forward pass (None for a dense model) for the balance losses and the routing-bias update.
DPO and GRPO run the main stack only (`DeepSeekModel.final_hidden`, no MTP modules), so their
stats cover the main MoE layers, not the MTP layers.

Batch layouts (int32 [B, T] unless stated):
  SFT:  input_ids, labels, loss_mask (1 on response targets only), optional segment_ids,
        positions (packed rows, see data/chat.py).
  DPO:  chosen_{input_ids,labels,loss_mask,segment_ids} and the same for rejected_ (one pair per
        row, right-padded, segment_ids 1 on real tokens); ref_chosen_logp, ref_rejected_logp
        float32 [B] (from `dpo_reference`, computed beforehand by the frozen reference).
  GRPO: input_ids, labels, loss_mask (1 on completion targets), segment_ids; old_logp float32
        [B, T] (the sampler's log-probs at the completion targets), advantages float32 [B] or
        [B, T]; ref_logp float32 [B, T] when beta > 0 (from `grpo_reference`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.logprobs import DEFAULT_CHUNK, head_logprobs
from deepseek_jax.losses import LossConfig, balance_loss, lm_loss
from deepseek_jax.rl import dpo_loss, grpo_loss

_DPO_FEATURES = ("input_ids", "labels", "loss_mask")
NO_BALANCE = LossConfig(mtp_lambda=0.0, seq_balance_alpha=0.0)
PRETRAIN_TERMS = LossConfig()  # MTP lambda 0.3 and the V3 sequence-wise balance loss


def _require(batch: dict, keys, objective: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{objective} batch lacks {missing}; it has {sorted(batch)}")


def _with_balance(loss, metrics, stats, model, loss_cfg: LossConfig):
    bal, bal_metrics = balance_loss(stats, model.cfg, loss_cfg)
    metrics.update(bal_metrics)
    metrics["loss"] = loss + bal
    return loss + bal, (metrics, stats)


def sft_objective(model, batch: dict, *, loss_cfg: LossConfig = PRETRAIN_TERMS):
    """Supervised fine-tuning: cross entropy on response tokens only (+ MTP loss, balance terms).

    The prompt is excluded through `loss_mask` (0 on every position whose target is a prompt,
    system or padding token), which the chat data sets; the MTP loss (weight
    `loss_cfg.mtp_lambda`, when the model has MTP modules) counts a depth-k target only where both
    position i and i+k are response targets.

    Args:
      model: a DeepSeekModel.
      batch: the SFT layout of the module docstring.
      loss_cfg: MTP lambda, balance-loss weights and z-loss.
    Returns:
      (loss, (metrics, moe_stats)); metrics has `main_loss` (response CE), `tokens`, `loss`.
    """
    _require(batch, ("input_ids", "labels", "loss_mask"), "sft_objective")
    out = model(
        batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    loss, metrics = lm_loss(out, batch, loss_cfg)
    return _with_balance(loss, metrics, out.moe_stats, model, loss_cfg)


def _policy_logprobs(model, batch: dict, prefix: str, chunk_size: int):
    h, stats = model.final_hidden(
        batch[prefix + "input_ids"],
        positions=batch.get(prefix + "positions"),
        segment_ids=batch.get(prefix + "segment_ids"),
    )
    logp, entropy = head_logprobs(model.head, h, batch[prefix + "labels"], chunk_size=chunk_size)
    return logp, entropy, stats


def sequence_logprobs(model, batch: dict, prefix: str = "", *, chunk_size: int = DEFAULT_CHUNK):
    """Summed log-probs of the masked targets per row: [B] (and MoEStats).

    Args:
      model: a DeepSeekModel.
      batch: holds `{prefix}input_ids`, `{prefix}labels`, `{prefix}loss_mask` and optionally
        `{prefix}segment_ids`, `{prefix}positions`.
      prefix: "chosen_", "rejected_" or "".
    """
    logp, _, stats = _policy_logprobs(model, batch, prefix, chunk_size)
    return (logp * batch[prefix + "loss_mask"]).sum(-1), stats


def _concat_pair(batch: dict) -> dict:
    """The chosen and rejected rows as one [2B, T] batch (one forward pass for both)."""
    for k in _DPO_FEATURES:
        c, r = batch["chosen_" + k], batch["rejected_" + k]
        if c.shape != r.shape:
            raise ValueError(f"chosen_{k} {c.shape} and rejected_{k} {r.shape} must match")
    keys = [k for k in (*_DPO_FEATURES, "segment_ids", "positions") if "chosen_" + k in batch]
    return {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in keys}


def dpo_reference(ref_model, batch: dict, *, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """The reference's summed response log-probs of a DPO batch, without gradients.

    Returns:
      {"ref_chosen_logp": [B], "ref_rejected_logp": [B]} float32, to merge into the batch.
    """
    _require(batch, [p + k for p in ("chosen_", "rejected_") for k in _DPO_FEATURES], "dpo")
    seq, _ = sequence_logprobs(ref_model, _concat_pair(batch), chunk_size=chunk_size)
    seq = jax.lax.stop_gradient(seq)
    B = batch["chosen_input_ids"].shape[0]
    return {"ref_chosen_logp": seq[:B], "ref_rejected_logp": seq[B:]}


def dpo_objective(
    model,
    batch: dict,
    *,
    beta: float = 0.1,
    loss_cfg: LossConfig = NO_BALANCE,
    chunk_size: int = DEFAULT_CHUNK,
):
    """DPO (DeepSeek LLM Sec. 5) on summed response log-probs; chosen and rejected in one pass.

    Args:
      model: the policy, a DeepSeekModel.
      batch: the DPO layout of the module docstring.
      beta: DPO's beta.
      loss_cfg: balance-loss weights for MoE models (MTP is not run; default: no extra terms).
      chunk_size: positions whose logits are materialised at once.
    Returns:
      (loss, (metrics, moe_stats)); metrics from `rl.dpo_loss` plus `tokens`, `loss`,
      `chosen_logp`, `rejected_logp` (means).
    """
    keys = [p + k for p in ("chosen_", "rejected_") for k in _DPO_FEATURES]
    _require(batch, keys + ["ref_chosen_logp", "ref_rejected_logp"], "dpo_objective")
    pair = _concat_pair(batch)
    seq, stats = sequence_logprobs(model, pair, chunk_size=chunk_size)  # [2B]
    B = batch["chosen_input_ids"].shape[0]
    loss, metrics = dpo_loss(
        seq[:B], seq[B:], batch["ref_chosen_logp"], batch["ref_rejected_logp"], beta=beta
    )
    metrics["tokens"] = pair["loss_mask"].sum().astype(jnp.float32)
    metrics["chosen_logp"] = jax.lax.stop_gradient(seq[:B].mean())
    metrics["rejected_logp"] = jax.lax.stop_gradient(seq[B:].mean())
    return _with_balance(loss, metrics, stats, model, loss_cfg)


def grpo_reference(ref_model, batch: dict, *, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """The reference's per-token log-probs of a GRPO batch, without gradients: {"ref_logp"}."""
    _require(batch, ("input_ids", "labels"), "grpo")
    logp, _, _ = _policy_logprobs(ref_model, batch, "", chunk_size)
    return {"ref_logp": jax.lax.stop_gradient(logp)}


def grpo_objective(
    model,
    batch: dict,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    loss_cfg: LossConfig = NO_BALANCE,
    chunk_size: int = DEFAULT_CHUNK,
):
    """GRPO (DeepSeekMath Sec. 4.1) on the completion tokens of rollouts.

    Args:
      model: the policy, a DeepSeekModel.
      batch: the GRPO layout of the module docstring.
      beta, epsilon, epsilon_high, loss_type, max_completion_length: as `rl.grpo_loss`.
      loss_cfg: balance-loss weights for MoE models (default: no extra terms).
      chunk_size: positions whose logits are materialised at once.
    Returns:
      (loss, (metrics, moe_stats)); metrics from `rl.grpo_loss` plus `entropy` (masked token
      mean), `tokens`, `loss`.
    """
    need = ["input_ids", "labels", "loss_mask", "old_logp", "advantages"]
    _require(batch, need + (["ref_logp"] if beta > 0 else []), "grpo_objective")
    logp, entropy, stats = _policy_logprobs(model, batch, "", chunk_size)
    mask = batch["loss_mask"]
    loss, metrics = grpo_loss(
        logp,
        batch["old_logp"],
        batch["advantages"],
        mask,
        ref_logp=batch.get("ref_logp"),
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=max_completion_length,
    )
    n = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    metrics["entropy"] = (entropy * mask).sum() / n
    metrics["tokens"] = mask.sum().astype(jnp.float32)
    return _with_balance(loss, metrics, stats, model, loss_cfg)
