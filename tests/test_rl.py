"""rl.py: GRPO / DPO losses and gradients, and advantages, against plain numpy re-derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.rl import LOSS_TYPES, dpo_loss, group_advantages, grpo_loss, process_advantages
from deepseek_jax.testing import assert_close

B, T = 4, 6


def np_grpo(logp, old, adv, mask, ref, beta, eps, eps_high, loss_type, L=None):
    """Loss and d loss / d logp of the GRPO objective, re-derived by hand in float64."""
    logp, old, mask = (np.asarray(x, np.float64) for x in (logp, old, mask))
    A = np.asarray(adv, np.float64)
    A = A[:, None] if A.ndim == 1 else A
    ratio = np.exp(logp - old)
    clipped = np.clip(ratio, 1 - eps, 1 + eps_high)
    per = -np.minimum(ratio * A, clipped * A)
    # The unclipped term is active (or tied, inside the range): d(-rho A)/dlogp = -rho A;
    # the clipped term is active only outside the range, where it is constant.
    dper = np.where(ratio * A <= clipped * A, -ratio * A, 0.0)
    if ref is not None:
        d = np.asarray(ref, np.float64) - logp
        per = per + beta * (np.exp(d) - d - 1)
        dper = dper + beta * (1 - np.exp(d))
    n = mask.sum(-1)
    if loss_type == "grpo":
        w = mask / (mask.shape[0] * np.maximum(n, 1))[:, None]
    elif loss_type in ("bnpo", "dapo"):
        w = mask / max(mask.sum(), 1)
    else:
        w = mask / (mask.shape[0] * (L or mask.shape[1]))
    return (per * w).sum(), dper * w


def _grpo_inputs(seed=0, per_token_adv=False):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
    logp = (old + rng.uniform(-0.5, 0.4, (B, T))).astype(np.float32)  # ratios in ~[0.6, 1.5]
    ref = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T) if per_token_adv else (B,)).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    mask[0, 4:] = 0  # right padding
    mask[1, :2] = 0  # prompt positions
    mask[2, 1] = 0  # a hole
    mask[3] = 0  # a row with no completion token
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_grad_match_numpy(loss_type, beta):
    logp, old, adv, mask, ref = _grpo_inputs()
    kw = dict(beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type)

    def f(lp):
        return grpo_loss(lp, old, adv, mask, ref_logp=ref if beta else None, **kw)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    want, want_grad = np_grpo(
        logp, old, adv, mask, ref if beta else None, beta, 0.2, 0.28, loss_type
    )
    assert_close(loss, want)
    assert_close(grad, want_grad)
    assert float(metrics["clip_fraction"]) > 0  # the clipped branch is exercised


def test_grpo_per_token_advantages_and_dr_grpo_length():
    logp, old, adv, mask, ref = _grpo_inputs(seed=1, per_token_adv=True)

    def f(lp):
        return grpo_loss(
            lp,
            old,
            adv,
            mask,
            ref_logp=ref,
            beta=0.1,
            loss_type="dr_grpo",
            max_completion_length=10,
        )[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    want, want_grad = np_grpo(logp, old, adv, mask, ref, 0.1, 0.2, 0.2, "dr_grpo", L=10)
    assert_close(loss, want)
    assert_close(grad, want_grad)


def test_grpo_metrics_by_hand():
    # One sequence, four tokens, eps 0.2: ratios 0.5 (A<0: clipped low), 1.5 (A>0: clipped high),
    # 1.5 with A<0 (not clipped), 1.0.
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.array([[0.5, 1.5, 1.5, 1.0]]))
    adv = jnp.array([[-1.0, 1.0, -1.0, 1.0]])
    ref = jnp.zeros((1, 4))
    _, m = grpo_loss(logp, old, adv, jnp.ones((1, 4)), ref_logp=ref, beta=0.0)
    assert float(m["clip_low_fraction"]) == pytest.approx(0.25)
    assert float(m["clip_high_fraction"]) == pytest.approx(0.25)
    assert float(m["clip_fraction"]) == pytest.approx(0.5)
    d = -np.log([0.5, 1.5, 1.5, 1.0])
    assert float(m["kl"]) == pytest.approx(np.mean(np.exp(d) - d - 1), rel=1e-5)
    assert float(m["completion_length"]) == 4.0


def test_grpo_on_policy_gradient_is_policy_gradient():
    # With old == logp (one update per rollout, as DeepSeekMath) the gradient is -A * mask / n.
    logp, _, adv, mask, _ = _grpo_inputs(seed=2)
    grad = jax.grad(lambda lp: grpo_loss(lp, logp, adv, mask)[0])(jnp.asarray(logp))
    n = np.maximum(mask.sum(-1, keepdims=True), 1)
    assert_close(grad, -adv[:, None] * mask / (B * n))


def test_grpo_errors():
    logp, old, adv, mask, ref = _grpo_inputs()
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="old_logp has shape"):
        grpo_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="epsilon_high=-0.1"):
        grpo_loss(logp, old, adv, mask, epsilon_high=-0.1)


def test_dpo_loss_and_grad_match_numpy():
    rng = np.random.default_rng(3)
    c, r, rc, rr = (rng.normal(-20, 3, (B,)).astype(np.float32) for _ in range(4))
    beta = 0.1
    (loss, m), (gc, gr) = jax.value_and_grad(
        lambda c, r: dpo_loss(c, r, rc, rr, beta=beta), argnums=(0, 1), has_aux=True
    )(jnp.asarray(c), jnp.asarray(r))
    z = beta * ((c.astype(np.float64) - rc) - (r - rr))
    assert_close(loss, np.mean(np.log1p(np.exp(-z))))
    sig = 1 / (1 + np.exp(z))  # sigmoid(-z)
    assert_close(gc, -beta * sig / B)
    assert_close(gr, beta * sig / B)
    assert_close(m["reward_margin"], z.mean())
    assert_close(m["reward_chosen"], (beta * (c - rc)).mean())
    assert float(m["reward_accuracy"]) == pytest.approx((z > 0).mean())
    with pytest.raises(ValueError, match="rejected_logp has shape"):
        dpo_loss(c, r[:2], rc, rr)
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(c, r, rc, rr, beta=0)


def test_group_advantages_bessel_and_scales():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9], np.float32)
    G = 4
    g = r.reshape(-1, G).astype(np.float64)
    centred = (g - g.mean(-1, keepdims=True)).reshape(-1)
    std = np.repeat(g.std(-1, ddof=1), G)
    assert_close(group_advantages(r, G), centred / (std + 1e-4))
    assert_close(group_advantages(r, G, scale="batch"), centred / (r.std(ddof=1) + 1e-4))
    assert_close(group_advantages(r, G, scale="none"), centred)
    # Bessel: two rewards 0 and 1 have std sqrt(0.5), not 0.5.
    assert_close(group_advantages(np.array([0.0, 1.0]), 2, eps=0.0), [-0.5 / 0.5**0.5, 0.5**0.5])
    # A group whose rewards are all equal gets zero advantages, not NaN.
    assert_close(group_advantages(np.ones(4), 2), np.zeros(4))
    with pytest.raises(ValueError, match="divide the number of rewards N=8"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="scale='global'"):
        group_advantages(r, 4, scale="global")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(r, 1)


def test_process_advantages_match_loop():
    rng = np.random.default_rng(4)
    N, K, G, Tc = 4, 3, 2, 8
    rewards = rng.normal(size=(N, K)).astype(np.float32)
    ends = np.sort(rng.integers(0, Tc, (N, K)), axis=-1)
    smask = np.ones((N, K), np.float32)
    smask[1, 2] = 0  # output 1 has two steps
    got = process_advantages(rewards, ends, smask, G, Tc)
    want = np.zeros((N, Tc))
    for g in range(N // G):
        rows = range(g * G, (g + 1) * G)
        vals = np.array([rewards[i, j] for i in rows for j in range(K) if smask[i, j]], np.float64)
        mean, std = vals.mean(), vals.std(ddof=1)
        for i in rows:
            for t in range(Tc):
                want[i, t] = sum(
                    (rewards[i, j] - mean) / (std + 1e-4)
                    for j in range(K)
                    if smask[i, j] and ends[i, j] >= t
                )
    assert_close(got, want)
    with pytest.raises(ValueError, match="step_ends has shape"):
        process_advantages(rewards, ends[:, :2], smask, G, Tc)
