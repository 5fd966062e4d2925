"""AdamW with masked weight decay, global-norm clipping and DeepSeek's learning-rate schedules.

The optimizer sees only `nnx.Param` values (as a pure dict): the aux-loss-free routing bias is a
`RoutingBias` variable, updated by the train step from expert loads, never by gradients.

Schedules (s = step, W = warmup_steps, S = steps, lr = peak, m = min_lr_ratio * lr):
  warm-up (all):  lr * min(1, (s + 1) / W)     so the first step already moves the weights
  "constant":     lr after warm-up
  "multistep":    lr * prod of step_factors[i] whose boundary step_boundaries[i] * S <= s
                  (DeepSeek LLM, Sec. 2.3: x0.316 at 80%, x0.1 at 90% of the steps)
  "cosine":       m + (lr - m) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W) clipped to [0, 1]
  "v3":           V3 Sec. 4.2 with boundaries in tokens (train/schedule.py): warm-up, lr until
                  decay_start_tokens, cosine to m until decay_end_tokens, m, then final_lr from
                  final_lr_tokens; steps map to tokens through the data's batch-size ramp
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from deepseek_jax.data import DataConfig
from deepseek_jax.norm import NormScale
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.schedule import v3_lr_schedule
from deepseek_jax.train.trainable import restrict


def _warmup(step: jax.Array, tcfg: TrainConfig) -> jax.Array:
    if tcfg.warmup_steps == 0:
        return jnp.ones_like(step)
    return jnp.minimum(1.0, (step + 1.0) / tcfg.warmup_steps)


def _cosine(progress: jax.Array, ratio: float) -> jax.Array:
    progress = jnp.clip(progress, 0.0, 1.0)
    return ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress))


def lr_schedule(
    tcfg: TrainConfig, data: DataConfig | None = None
) -> Callable[[jax.Array], jax.Array]:
    """The learning rate as a function of the (applied-update) step count.

    Args:
      tcfg: supplies schedule, lr, warmup_steps, steps and the schedule's shape parameters.
      data: batch size, sequence length and batch-size ramp, which turn the "v3" token
        boundaries into steps; None = one token per step (fractions of `steps` only).
    Returns:
      A jittable `step -> lr` (float32 scalar), usable as an optax schedule.
    """
    S, W = tcfg.steps, tcfg.warmup_steps
    if tcfg.schedule == "v3":
        if data is None:
            token_fields = ("decay_start_tokens", "decay_end_tokens", "final_lr_tokens")
            given = [f for f in token_fields if getattr(tcfg, f) is not None]
            if given:  # the optimizer's state does not need it (init); an update does
                msg = f"TrainConfig.{given[0]} is in tokens: pass the DataConfig"

                def missing(step):
                    raise ValueError(msg)

                return missing
            data = DataConfig(global_batch_size=1, seq_len=1)  # one "token" per step
        return v3_lr_schedule(tcfg, data)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        if tcfg.schedule == "constant":
            factor = jnp.ones_like(s)
        elif tcfg.schedule == "multistep":
            factor = jnp.ones_like(s)
            for boundary, f in zip(tcfg.step_boundaries, tcfg.step_factors, strict=True):
                # Boundaries in DeepSeek LLM multiply the *peak*: x0.316 then x0.1 (not 0.0316).
                factor = jnp.where(s >= round(boundary * S), f, factor)
        else:  # "cosine"
            factor = _cosine((s - W) / max(S - W, 1), tcfg.min_lr_ratio)
        return (tcfg.lr * _warmup(s, tcfg) * factor).astype(jnp.float32)

    return schedule


def weight_decay_mask(params: nnx.State) -> dict:
    """True where a parameter is decayed: every `nnx.Param` except the `NormScale`s.

    Chosen by variable type, so renaming a module cannot change what is decayed.

    Args:
      params: the model's parameters as variables, `nnx.state(model, nnx.Param)` of a real or an
        abstract (`nnx.eval_shape`) model.
    Returns:
      A tree of bools shaped like `nnx.to_pure_dict(params)` (the train state's params).
    """
    flat = {path: not isinstance(v, NormScale) for path, v in nnx.to_flat_state(params)}
    return traverse_util.unflatten_dict(flat)


def make_optimizer(
    tcfg: TrainConfig, data: DataConfig | None = None, *, decay_mask, train_mask=None
) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(b1, b2, eps, weight_decay masked, mu_dtype).

    `decay_mask` is `weight_decay_mask(nnx.state(model, nnx.Param))`: a tree of bools shaped
    like the params (or a callable of the params returning one); `train_mask`
    (`trainable_mask(model, tcfg.trainable)`, needed unless every parameter trains) zeroes the
    updates of frozen parameters. The learning rate follows
    `lr_schedule(tcfg)` over the number of *applied* updates (optax's own count): a step skipped
    for non-finite gradients does not advance the schedule.
    """
    mu_dtype = jnp.bfloat16 if tcfg.mu_dtype == "bfloat16" else None
    adamw = optax.adamw(
        learning_rate=lr_schedule(tcfg, data),
        b1=tcfg.b1,
        b2=tcfg.b2,
        eps=tcfg.eps,
        weight_decay=tcfg.weight_decay,
        mask=decay_mask,
        mu_dtype=mu_dtype,
    )
    if tcfg.clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), adamw)
    if train_mask is None:
        if tcfg.trainable != "all":
            raise ValueError(f"train.trainable={tcfg.trainable!r} needs the model's train_mask")
        return adamw
    return restrict(adamw, train_mask)  # train.trainable=mtp: zero updates elsewhere
