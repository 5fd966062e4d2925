"""Post-training objectives as pure functions of log-probabilities: GRPO and DPO.

GRPO (DeepSeekMath, arXiv 2402.03300, Sec. 4.1, eq. 3):
  for each question q, G outputs o_1..o_G are sampled from pi_old; every token t of o_i gets an
  advantage A_{i,t} and the policy maximises

    1/G sum_i 1/|o_i| sum_t { min(rho_{i,t} A_{i,t}, clip(rho_{i,t}, 1-eps, 1+eps) A_{i,t})
                              - beta D_KL[pi_theta || pi_ref] },     rho = pi_theta / pi_old,

  with the unbiased per-token KL estimator of eq. 4:
    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1  (>= 0, = 0 iff the two agree).

  Outcome supervision (Sec. 4.1.2): A_{i,t} = (r_i - mean(r)) / std(r) over the group.
  Process supervision (Sec. 4.1.3): each reasoning step j of output i ends at token index(j) and
  has a reward r_i^index(j); rewards are normalised over every step of every output in the group,
  and A_{i,t} = sum_{index(j) >= t} r~_i^index(j).

  Aggregations (`loss_type`): "grpo" the paper's mean over sequences of each one's token mean;
  "bnpo"/"dapo" the token mean over the batch (DAPO, arXiv 2503.14476); "dr_grpo" the token sum
  over a constant B x max_completion_length (Dr. GRPO, arXiv 2503.20783). `epsilon_high` gives
  DAPO's separate upper clip bound.

DPO (DeepSeek LLM, arXiv 2401.02954, Sec. 5; Rafailov et al. 2023):
  L = -log sigmoid(beta ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))),
  on the summed log-probabilities of the response tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")


def _bessel_std(x: jax.Array, axis=None) -> jax.Array:
    return jnp.std(x, axis=axis, ddof=1)


def group_advantages(
    rewards: jax.Array, group_size: int, *, eps: float = 1e-4, scale: str = "group"
) -> jax.Array:
    """Outcome-supervision advantages, one per completion (DeepSeekMath Sec. 4.1.2).

    Args:
      rewards: [N] float, ordered group by group (the G completions of one prompt together).
      group_size: G; N must be a multiple of it.
      eps: added to the standard deviation.
      scale: "group" divides by each group's std (Bessel-corrected), "batch" by the std of the
        whole batch (Bessel-corrected), "none" only subtracts the group mean (Dr. GRPO).
    Returns:
      [N] float32 advantages (r - group mean) / (std + eps).
    Raises:
      ValueError: N is not a multiple of group_size, group_size < 2 with scale="group", or an
        unknown scale.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} must be one of {ADVANTAGE_SCALES}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the number of rewards "
            f"N={rewards.shape[0]}"
        )
    if scale == "group" and group_size < 2:
        raise ValueError(f"group_size={group_size}: a group std needs at least 2 completions")
    grouped = rewards.reshape(-1, group_size)  # [N/G, G]
    centred = (grouped - grouped.mean(-1, keepdims=True)).reshape(-1)  # [N]
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.repeat(_bessel_std(grouped, axis=-1), group_size)  # [N]
    else:
        std = _bessel_std(rewards)
    return centred / (std + eps)


def process_advantages(
    step_rewards: jax.Array,
    step_ends: jax.Array,
    step_mask: jax.Array,
    group_size: int,
    num_tokens: int,
    *,
    eps: float = 1e-4,
) -> jax.Array:
    """Process-supervision advantages, one per completion token (DeepSeekMath Sec. 4.1.3).

    Step rewards are normalised with the mean and (Bessel) std of all valid steps of the group's
    outputs; the advantage of token t is the sum of the normalised rewards of the steps that end
    at or after t. Tokens after the last step get 0.

    Args:
      step_rewards: [N, K] reward of each step (K = most steps of any output, padded).
      step_ends: [N, K] int, index in the completion of the last token of each step.
      step_mask: [N, K] 1 for a real step, 0 for padding.
      group_size: G; completions ordered group by group, N a multiple of G.
      num_tokens: T, the completion length of the returned advantages.
      eps: added to the standard deviation.
    Returns:
      [N, T] float32 advantages.
    """
    step_rewards = jnp.asarray(step_rewards, jnp.float32)
    N, K = step_rewards.shape
    for name, a in (("step_ends", step_ends), ("step_mask", step_mask)):
        if a.shape != (N, K):
            raise ValueError(f"{name} has shape {a.shape}, expected step_rewards' {(N, K)}")
    if group_size < 1 or N % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide N={N}")
    m = jnp.asarray(step_mask, jnp.float32).reshape(-1, group_size * K)  # [N/G, G K]
    r = step_rewards.reshape(-1, group_size * K)
    n = m.sum(-1, keepdims=True)
    mean = (r * m).sum(-1, keepdims=True) / jnp.maximum(n, 1.0)
    var = (((r - mean) * m) ** 2).sum(-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    normed = ((r - mean) / (jnp.sqrt(var) + eps) * m).reshape(N, K)  # [N, K]
    t = jnp.arange(num_tokens)  # [T]
    covers = step_ends[:, None, :] >= t[None, :, None]  # [N, T, K]: step ends at or after t
    return jnp.einsum("ntk,nk->nt", covers.astype(jnp.float32), normed)


def _check_same_shape(ref_name: str, ref: jax.Array, **arrays) -> None:
    for name, a in arrays.items():
        if a is not None and a.shape != ref.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {ref_name}'s {ref.shape}")


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped GRPO objective with a per-token KL penalty (DeepSeekMath eq. 3-4), as a loss.

    Per token: -min(rho A, clip(rho, 1-epsilon, 1+epsilon_high) A)
               + beta (exp(ref - logp) - (ref - logp) - 1),      rho = exp(logp - old_logp).

    Args:
      logp: [B, T] log-probs of the completion tokens under the policy (differentiated).
      old_logp: [B, T] log-probs under the sampling policy (no gradient flows into them).
      advantages: [B] per completion (outcome supervision) or [B, T] per token (process).
      mask: [B, T] 1 on completion tokens, 0 on prompt and padding.
      ref_logp: [B, T] reference log-probs; required when beta > 0.
      beta: KL coefficient (DeepSeekMath: 0.04).
      epsilon: lower (and default upper) clip range.
      epsilon_high: upper clip range (DAPO's clip-higher); None = epsilon.
      loss_type: "grpo" | "bnpo" | "dapo" | "dr_grpo" (module docstring).
      max_completion_length: the Dr. GRPO normaliser's length; None = T.
    Returns:
      (scalar loss, metrics): `kl` (masked token mean of the estimator), `clip_fraction`,
      `clip_low_fraction`, `clip_high_fraction` (masked token share where the clipped term is the
      active one), `ratio_mean`, `completion_length` (mean mask sum per sequence).
    Raises:
      ValueError: a bad loss_type, a negative coefficient, mismatched shapes, or beta > 0 without
        ref_logp.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_TYPES}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    for name, v in (("epsilon", epsilon), ("epsilon_high", eps_high), ("beta", beta)):
        if not v >= 0:
            raise ValueError(f"{name}={v} must be >= 0")
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    _check_same_shape("logp", logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp)
    B, T = logp.shape
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(
            f"advantages has shape {advantages.shape}, expected [B]={(B,)} or [B, T]={(B, T)}"
        )
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference model's log-probs)")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length={max_completion_length} must be >= 1")

    mask = mask.astype(jnp.float32)
    logp = logp.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    adv = adv[:, None] if adv.ndim == 1 else adv  # [B, 1] or [B, T]

    ratio = jnp.exp(logp - old_logp)  # [B, T]
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)  # [B, T]
    kl = jnp.zeros_like(per_token)
    if ref_logp is not None:
        d = jax.lax.stop_gradient(ref_logp.astype(jnp.float32)) - logp  # log(pi_ref / pi_theta)
        kl = jnp.exp(d) - d - 1.0  # eq. 4
        per_token = per_token + beta * kl

    tokens = mask.sum(-1)  # [B]
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / jnp.maximum(tokens, 1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    else:  # dr_grpo
        L = T if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (B * L)

    n = jnp.maximum(mask.sum(), 1.0)

    def token_mean(x):
        return jax.lax.stop_gradient((x * mask).sum() / n)

    low = ((ratio < 1.0 - epsilon) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    metrics = {
        "kl": token_mean(kl),
        "clip_fraction": token_mean(low + high),
        "clip_low_fraction": token_mean(low),
        "clip_high_fraction": token_mean(high),
        "ratio_mean": token_mean(ratio),
        "completion_length": tokens.mean(),
    }
    return loss, metrics


def dpo_loss(
    chosen_logp: jax.Array,
    rejected_logp: jax.Array,
    ref_chosen_logp: jax.Array,
    ref_rejected_logp: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DPO loss on summed response log-probs (DeepSeek LLM Sec. 5).

    Args:
      chosen_logp, rejected_logp: [B] summed log-probs of the preferred / dispreferred response
        under the policy.
      ref_chosen_logp, ref_rejected_logp: [B] the same under the frozen reference (no gradient).
      beta: inverse temperature of the implicit reward.
    Returns:
      (scalar loss, metrics): `reward_chosen`, `reward_rejected` (mean implicit rewards
      beta (log pi - log ref)), `reward_margin` (mean chosen - rejected), `reward_accuracy`
      (share of pairs whose chosen reward is higher).
    """
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if chosen_logp.ndim != 1:
        raise ValueError(f"chosen_logp must be [B], got shape {chosen_logp.shape}")
    _check_same_shape(
        "chosen_logp",
        chosen_logp,
        rejected_logp=rejected_logp,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
    )
    sg = jax.lax.stop_gradient
    r_w = beta * (chosen_logp - sg(ref_chosen_logp)).astype(jnp.float32)  # [B]
    r_l = beta * (rejected_logp - sg(ref_rejected_logp)).astype(jnp.float32)
    loss = -jax.nn.log_sigmoid(r_w - r_l).mean()
    metrics = {
        "reward_chosen": sg(r_w.mean()),
        "reward_rejected": sg(r_l.mean()),
        "reward_margin": sg((r_w - r_l).mean()),
        "reward_accuracy": sg((r_w > r_l).astype(jnp.float32).mean()),
    }
    return loss, metrics
