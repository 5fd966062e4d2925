"""`PostConfig`: the `post` section of a run config (SFT, DPO and GRPO settings).

`train.task` picks the objective (`pretrain`, `sft`, `dpo`, `grpo`); this section holds what the
post-training tasks add: the chat data file, DPO's beta, GRPO's sampling, rewards and clipping,
the reference model's reset and whether the MoE routing bias keeps updating. Batch size, sequence
length and tokenizer stay in `data` (`global_batch_size` rows: SFT packed rows, DPO pairs, GRPO
completions), the optimizer in `train`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from deepseek_jax.rl import ADVANTAGE_SCALES, LOSS_TYPES

TASKS = ("pretrain", "sft", "dpo", "grpo")
REWARDS = ("accuracy", "format")
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
AdvantageScale = Literal["group", "batch", "none"]
assert set(typing.get_args(LossType)) == set(LOSS_TYPES)
assert set(typing.get_args(AdvantageScale)) == set(ADVANTAGE_SCALES)


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"PostConfig.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """Post-training settings (read when `train.task` is sft, dpo or grpo).

    Attributes:
      data: the JSONL file: `{"messages"}` dialogues (sft), `{"prompt", "chosen", "rejected"}`
        (dpo) or `{"prompt", "answer"}` (grpo); see deepseek_jax/data/chat.py.
      chat_template: a folder with the checkpoint's `tokenizer_config.json` (chat_template) and
        `tokenizer.json`; None = our `SimpleChatTemplate` over `data.tokenizer`.
      pack: SFT: pack several dialogues per row (segment ids) instead of one per row.
      update_routing_bias: keep the aux-loss-free routing-bias update (train.bias_update_speed);
        None = yes for sft, no (frozen) for dpo and grpo.
      dpo_beta: DPO's beta (DeepSeek LLM Sec. 5).
      beta: GRPO's KL coefficient (DeepSeekMath: 0.04); 0 skips the reference forward.
      epsilon, epsilon_high: the ratio's clip range [1 - epsilon, 1 + epsilon_high]
        (epsilon_high None = epsilon; DAPO uses a larger upper bound).
      loss_type: GRPO aggregation: "grpo" (per-sequence token mean, averaged), "bnpo" / "dapo"
        (token mean over the batch), "dr_grpo" (token sum / (B x max_new_tokens)).
      group_size: G completions per prompt; data.global_batch_size must be a multiple of it.
      mu: optimizer updates per rollout batch (the GRPO inner iterations).
      max_new_tokens, temperature, top_k, top_p: rollout sampling (the engine's log-probs are the
        raw model's, so they are pi_old exactly only at temperature 1, top_k 0, top_p 1).
      rewards: reward functions by name (deepseek_jax/rewards.py: accuracy, format).
      reward_weights: one weight per reward in the total.
      advantage_scale: "group" (DeepSeekMath), "batch" or "none" (Dr. GRPO); see rl.py.
      ref_reset_every: iterative GRPO: the reference becomes the current policy every this many
        steps (0 = never).
      chunk_size: positions whose logits are materialised at once in the log-prob passes.
    """

    data: str | None = None
    chat_template: str | None = None
    pack: bool = True
    update_routing_bias: bool | None = None
    dpo_beta: float = 0.1
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: LossType = "grpo"
    group_size: int = 8
    mu: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    rewards: tuple[str, ...] = REWARDS
    reward_weights: tuple[float, ...] = (1.0, 1.0)
    advantage_scale: AdvantageScale = "group"
    ref_reset_every: int = 0
    chunk_size: int = 128

    def __post_init__(self):
        for name in ("dpo_beta", "beta", "epsilon", "temperature"):
            if not 0 <= getattr(self, name) < float("inf"):
                _fail(name, getattr(self, name), "must be a finite number >= 0")
        if self.epsilon_high is not None and not 0 <= self.epsilon_high < float("inf"):
            _fail("epsilon_high", self.epsilon_high, "must be >= 0 or null")
        if self.loss_type not in LOSS_TYPES:
            _fail("loss_type", self.loss_type, f"allowed: {list(LOSS_TYPES)}")
        if self.advantage_scale not in ADVANTAGE_SCALES:
            _fail("advantage_scale", self.advantage_scale, f"allowed: {list(ADVANTAGE_SCALES)}")
        if self.group_size < 2:
            _fail("group_size", self.group_size, "must be >= 2 (advantages compare a group)")
        for name in ("mu", "max_new_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        for name in ("top_k", "ref_reset_every"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be >= 0")
        if not 0 < self.top_p <= 1:
            _fail("top_p", self.top_p, "must be in (0, 1]")
        object.__setattr__(self, "rewards", tuple(self.rewards))
        object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
        unknown = [r for r in self.rewards if r not in REWARDS]
        if not self.rewards or unknown:
            _fail("rewards", self.rewards, f"a non-empty list of {list(REWARDS)}")
        if len(self.reward_weights) != len(self.rewards):
            _fail("reward_weights", self.reward_weights, "need one weight per entry of rewards")

    def routing_bias_updates(self, task: str) -> bool:
        """Whether the routing bias keeps updating during `task`."""
        if self.update_routing_bias is not None:
            return self.update_routing_bias
        return task in ("pretrain", "sft")
