"""Losses against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.losses import (
    LossConfig,
    comm_balance_loss,
    cross_entropy,
    device_balance_loss,
    expert_balance_loss,
    mtp_targets,
    seq_balance_loss,
)
from deepseek_jax.moe import MoEStats

# 4 experts in 2 groups, top-2, one layer, two sequences of 2 tokens each.
CFG = load_preset("v3-tiny").replace(
    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1
)
# Sequence 0: tokens pick {0,1} and {0,1}; sequence 1: {2,3} and {0,2}.
COUNTS = jnp.array([[[2.0, 2.0, 0.0, 0.0], [1.0, 0.0, 2.0, 1.0]]])
# Per-token normalised affinities summed over each sequence's 2 tokens.
SCORES = jnp.array([[[0.8, 0.6, 0.4, 0.2], [0.5, 0.1, 0.9, 0.5]]])
GROUPS = jnp.array([[[2.0, 0.0], [1.0, 2.0]]])  # tokens sending to each group
STATS = MoEStats(COUNTS, SCORES, GROUPS, jnp.zeros(1), jnp.array([[2.0, 2.0]]))


def test_seq_balance_loss_by_hand():
    # f_i = E/(K T) * count = 4/(2*2) * count = count; P_i = score_sum / T.
    seq0 = 2 * 0.4 + 2 * 0.3  # = 1.4
    seq1 = 1 * 0.25 + 0 + 2 * 0.45 + 1 * 0.25  # = 1.4
    assert float(seq_balance_loss(STATS, CFG)) == pytest.approx((seq0 + seq1) / 2)


def test_v2_expert_device_comm_losses_by_hand():
    cfg = CFG.replace(seq_aux=False)  # batch-wise f, P (per-sequence: tests/test_fidelity.py)
    T = 4  # tokens in the batch
    f = np.array([3.0, 2.0, 2.0, 1.0]) * 4 / (2 * T)  # E/(K T) * count
    P = np.array([1.3, 0.7, 1.3, 0.7]) / T
    assert float(expert_balance_loss(STATS, cfg)) == pytest.approx((f * P).sum())
    f_dev = np.array([f[:2].mean(), f[2:].mean()])
    P_dev = np.array([P[:2].sum(), P[2:].sum()])
    assert float(device_balance_loss(STATS, cfg)) == pytest.approx((f_dev * P_dev).sum())
    f_comm = np.array([3.0, 2.0]) * 2 / (1 * T)  # D/(M T) * tokens sent to the device
    assert float(comm_balance_loss(STATS, cfg)) == pytest.approx((f_comm * P_dev).sum())


def test_perfect_balance_minimises_expert_loss():
    # Uniform routing and uniform scores: f_i = 1, P_i = 1/E, loss = 1.
    uniform = MoEStats(
        jnp.full((1, 1, 4), 2.0),
        jnp.full((1, 1, 4), 1.0),
        jnp.ones((1, 1, 2)),
        jnp.zeros(1),
        jnp.array([[4.0]]),
    )
    assert float(expert_balance_loss(uniform, CFG)) == pytest.approx(1.0)
    assert float(seq_balance_loss(uniform, CFG)) == pytest.approx(1.0)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    loss, n, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert float(loss) == pytest.approx((nll * mask).sum() / mask.sum(), rel=1e-6)
    assert float(n) == 3


def test_mtp_targets_shift_and_respect_documents():
    labels = jnp.array([[11, 12, 13, 14, 15, 16]])
    mask = jnp.ones((1, 6))
    seg = jnp.array([[1, 1, 1, 2, 2, 2]])
    lab, m = mtp_targets(labels, mask, seg, depth=1)
    # Position i predicts labels[i+1] = t_{i+2}; never across the document boundary at 3.
    np.testing.assert_array_equal(np.asarray(lab[0, :5]), [12, 13, 14, 15, 16])
    np.testing.assert_array_equal(np.asarray(m[0]), [1, 1, 0, 1, 1, 0])


def test_loss_config_validation():
    with pytest.raises(ValueError, match="LossConfig.mtp_lambda"):
        LossConfig(mtp_lambda=-1)
