"""The shared train step on the dense DeepSeek-LLM-style preset (standard attention, no MoE)."""

import jax
import numpy as np

from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state, make_train_step

B, T = 4, 32


def test_dense_small_trains_a_few_steps():
    cfg = load_preset("dense-small")  # scanned layers with cfg.remat="full" (the default)
    assert cfg.attention_type == "mha" and not cfg.is_moe and cfg.remat == "full"
    tcfg = TrainConfig(steps=6, lr=3e-3, warmup_steps=0, schedule="multistep")
    graphdef, state = init_train_state(cfg, tcfg, seed=0)
    step = make_train_step(cfg, LossConfig(), tcfg, graphdef, donate=False)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((B, T), np.int32)}
    losses = []
    for _ in range(6):  # the same batch: the loss must fall
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.5  # starts near uniform
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
