"""GRPO training rows from rollouts: prompt + completion, with the sampler's log-probs aligned.

Row b holds `seq = prompt_b + completion_b` as next-token pairs (`input_ids = seq[:-1]`,
`labels = seq[1:]`), so completion token j (`seq[P + j]`, P the prompt length) is the label at
position P + j - 1. `loss_mask`, `old_logp` (the log-prob the sampler returned for that token,
reused as pi_old: no second forward) and per-token advantages sit at those positions; prompt
and padding positions have loss_mask 0. The layout is the GRPO batch of
deepseek_jax/train/objectives_post.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rollout_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    completion_logprobs: Sequence[Sequence[float]],
    advantages: np.ndarray,
    *,
    seq_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Builds a GRPO batch from N rollouts.

    Args:
      prompts: N prompt token lists (each prompt repeated for each of its G completions).
      completions: N generated token lists (a stop token included when one ended the row).
      completion_logprobs: N lists, the sampler's raw log-prob of each completion token.
      advantages: [N] per completion, or [N, Tc] per completion token (Tc >= longest completion).
      seq_len: T, row length; each prompt + completion must have at most T + 1 tokens.
      pad_id: token written on unused positions.
    Returns:
      int32 [N, T] `input_ids`, `labels`, `loss_mask`, `segment_ids`; float32 [N, T] `old_logp`;
      `advantages` float32 [N] or [N, T].
    Raises:
      ValueError: mismatched counts or lengths (naming the rollout), an empty prompt or
        completion, or a row longer than seq_len + 1.
    """
    N = len(prompts)
    if not (len(completions) == len(completion_logprobs) == N):
        raise ValueError(
            f"{N} prompts, {len(completions)} completions and {len(completion_logprobs)} "
            "log-prob lists must match"
        )
    advantages = np.asarray(advantages, np.float32)
    if advantages.shape[:1] != (N,) or advantages.ndim > 2:
        raise ValueError(f"advantages has shape {advantages.shape}, expected [N]={N} or [N, Tc]")
    per_token = advantages.ndim == 2
    out = {k: np.zeros((N, seq_len), np.int32) for k in ("input_ids", "labels", "loss_mask")}
    out["segment_ids"] = np.zeros((N, seq_len), np.int32)
    out["input_ids"][:] = pad_id
    out["labels"][:] = pad_id
    out["old_logp"] = np.zeros((N, seq_len), np.float32)
    adv = np.zeros((N, seq_len), np.float32) if per_token else advantages
    for b, (p, c, lp) in enumerate(zip(prompts, completions, completion_logprobs, strict=True)):
        P, C = len(p), len(c)
        if P == 0 or C == 0:
            raise ValueError(f"rollout {b}: empty prompt ({P}) or completion ({C})")
        if len(lp) != C:
            raise ValueError(f"rollout {b}: {C} completion tokens but {len(lp)} log-probs")
        if P + C - 1 > seq_len:
            raise ValueError(f"rollout {b}: {P} + {C} tokens do not fit seq_len={seq_len} (+1)")
        if per_token and advantages.shape[1] < C:
            raise ValueError(
                f"rollout {b}: {C} completion tokens but {advantages.shape[1]} per-token advantages"
            )
        seq = np.asarray(list(p) + list(c), np.int32)
        n = P + C - 1
        out["input_ids"][b, :n] = seq[:-1]
        out["labels"][b, :n] = seq[1:]
        out["segment_ids"][b, :n] = 1
        out["loss_mask"][b, P - 1 : n] = 1
        out["old_logp"][b, P - 1 : n] = lp
        if per_token:
            adv[b, P - 1 : n] = advantages[b, :C]
    out["advantages"] = adv
    return out
