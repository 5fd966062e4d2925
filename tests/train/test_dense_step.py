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


def test_dense_pipeline_matches_gradient_accumulation():
    """Two stages of the dense stack (1F1B, 2 micro-batches) == the plain step accumulating the
    same 2 micro-batches."""
    import dataclasses

    from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
    from deepseek_jax.sharding.pipeline import PipelineConfig
    from deepseek_jax.sharding.rules import get_rules
    from deepseek_jax.testing import MODEL_FP32

    cfg = load_preset("dense-small").replace(
        vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8, remat="none"
    )
    tcfg = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, schedule="constant")
    graphdef, state = init_train_state(cfg, tcfg, seed=0)
    plain = make_train_step(
        cfg, LossConfig(), dataclasses.replace(tcfg, grad_accum=2), graphdef, donate=False
    )
    mesh = make_mesh(MeshConfig(fsdp=1, stage=2, rules="dp"), devices=jax.devices()[:2])
    piped = make_train_step(
        cfg,
        LossConfig(),
        tcfg,
        graphdef,
        mesh=mesh,
        rules=get_rules("dp"),
        donate=False,
        pipeline=PipelineConfig("1f1b", 2),
    )
    s_plain, s_pipe = state, jax.device_put(state)
    for seed in range(2):
        ids = np.random.default_rng(seed).integers(3, 64, (B, 9)).astype(np.int32)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((B, 8))}
        s_plain, m_plain = plain(s_plain, batch)
        s_pipe, m_pipe = piped(s_pipe, batch)
        np.testing.assert_allclose(float(m_pipe["loss"]), float(m_plain["loss"]), **MODEL_FP32)
    for a, b in zip(jax.tree.leaves(s_pipe.params), jax.tree.leaves(s_plain.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **MODEL_FP32)
