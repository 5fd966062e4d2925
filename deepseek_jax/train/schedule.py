"""DeepSeek-V3's pre-training schedules in tokens: the batch-size ramp and the learning rate.

V3 report Sec. 4.2 (Hyper-Parameters): the learning rate warms up linearly to 2.2e-4 over the
first 2K steps, stays there until 10T tokens, decays along a cosine to 2.2e-5 over 4.3T tokens,
is held at 2.2e-5 for 333B tokens and at 7.3e-6 for the last 167B tokens (14.8T in all). The batch
size grows from 3072 to 15360 sequences over the first 469B tokens, then stays at 15360.

Every boundary is in tokens. The ramp is discretised to `DataConfig.batch_ramp_increment` (each
size is a compiled shape): batch(t) = start + inc * floor((end - start) * min(t, R) / (R inc)),
where t counts the tokens of the steps before (so each step's size is known before it runs).
`data.ramp.BatchPlan` maps steps to tokens exactly under that rule; the learning rate's token
boundaries become step boundaries through it and the stages are joined with
`optax.join_schedules`.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from deepseek_jax.data import DataConfig
from deepseek_jax.data.ramp import BatchPlan, batch_plan

__all__ = ["BatchPlan", "batch_plan", "v3_lr_schedule"]


def v3_lr_schedule(tcfg, data: DataConfig) -> optax.Schedule:
    """V3 Sec. 4.2: warm-up, constant, cosine, constant min, constant final -> step -> lr.

    Token boundaries: `tcfg.decay_start_tokens` / `decay_end_tokens` (default: the fractions
    `decay_start` / `decay_end` of the run's tokens), `final_lr_tokens` where `final_lr` begins
    (None: no final stage).
    """
    plan = batch_plan(data)
    total = plan.tokens_before(tcfg.steps)
    start_t = tcfg.decay_start_tokens
    end_t = tcfg.decay_end_tokens
    start_t = tcfg.decay_start * total if start_t is None else start_t
    end_t = tcfg.decay_end * total if end_t is None else end_t
    s_start, s_end = plan.step_at(start_t), plan.step_at(end_t)
    W, lr, low = tcfg.warmup_steps, tcfg.lr, tcfg.lr * tcfg.min_lr_ratio
    if W > s_start:
        raise ValueError(
            f"TrainConfig.warmup_steps={W} must end before the decay starts (step {s_start})"
        )

    def warmup(s):
        return lr * jnp.minimum(1.0, (jnp.asarray(s, jnp.float32) + 1.0) / max(W, 1))

    stages = [warmup, optax.constant_schedule(lr)]
    bounds = [W, s_start]
    stages.append(optax.cosine_decay_schedule(lr, max(s_end - s_start, 1), alpha=low / lr))
    bounds.append(s_end)
    stages.append(optax.constant_schedule(low))
    if tcfg.final_lr is not None and tcfg.final_lr_tokens is not None:
        bounds.append(plan.step_at(tcfg.final_lr_tokens))
        stages.append(optax.constant_schedule(tcfg.final_lr))
    joined = optax.join_schedules(stages, bounds)
    return lambda step: jnp.asarray(joined(step), jnp.float32)
