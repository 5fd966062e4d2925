"""Training through the pipeline executor: a few optimizer steps match the plain step."""

import jax
import numpy as np
import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.pipeline import PipelineConfig
from deepseek_jax.sharding.rules import get_rules
from deepseek_jax.testing import MODEL_FP32
from deepseek_jax.train.config import TrainConfig, load_run_config
from deepseek_jax.train.step import init_train_state, make_train_step

B, T = 4, 8


def _batch(cfg, seed):
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((B, T), np.int32)}


# DualPipe / ZB1P equality with the plain model (loss and every gradient) is held in
# tests/sharding/test_pipeline_executor.py; here one schedule proves the optimizer wiring.
@pytest.mark.slow
@pytest.mark.parametrize("schedule, stages, microbatches", [("1f1b", 2, 2)])
def test_pipelined_steps_match_plain_steps(schedule, stages, microbatches):
    cfg = load_preset("v3-tiny").replace(num_hidden_layers=1 + 2, remat="none")
    lcfg = LossConfig(seq_balance_alpha=0.01)
    tcfg = TrainConfig(
        steps=3, lr=1e-2, warmup_steps=0, schedule="constant", bias_update_speed=0.01
    )
    graphdef, state = init_train_state(cfg, tcfg, seed=0)
    plain = make_train_step(cfg, lcfg, tcfg, graphdef, donate=False)
    mesh = make_mesh(MeshConfig(fsdp=1, stage=stages, rules="dp"), devices=jax.devices()[:stages])
    piped = make_train_step(
        cfg,
        lcfg,
        tcfg,
        graphdef,
        mesh=mesh,
        rules=get_rules("dp"),
        donate=False,
        pipeline=PipelineConfig(schedule, microbatches),
    )
    if microbatches > 1:  # one compiled step for the plain side, built outside the loop
        plain = _accum(cfg, lcfg, tcfg, graphdef, microbatches)
    s_plain, s_pipe = state, jax.device_put(state)
    plain = plain.lower(s_plain, _batch(cfg, 0)).compile()
    piped = piped.lower(s_pipe, _batch(cfg, 0)).compile()
    for i in range(3):
        batch = _batch(cfg, i)
        # The plain step sees the same micro-batch split through gradient accumulation's
        # definition: a pipelined loss is the mean of per-micro-batch losses.
        s_plain, m_plain = plain(s_plain, batch)
        s_pipe, m_pipe = piped(s_pipe, batch)
        np.testing.assert_allclose(float(m_pipe["loss"]), float(m_plain["loss"]), **MODEL_FP32)
    for a, b in zip(jax.tree.leaves(s_pipe.params), jax.tree.leaves(s_plain.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **MODEL_FP32)
    for a, b in zip(jax.tree.leaves(s_pipe.biases), jax.tree.leaves(s_plain.biases), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **MODEL_FP32)


def _accum(cfg, lcfg, tcfg, graphdef, microbatches):
    import dataclasses

    return make_train_step(
        cfg, lcfg, dataclasses.replace(tcfg, grad_accum=microbatches), graphdef, donate=False
    )


def test_run_config_pipeline_validation():
    with pytest.raises(ValueError, match="mesh.stage=2 and pipeline.schedule='none'"):
        load_run_config(None, ["mesh.stage=2", "mesh.fsdp=1"])
    with pytest.raises(ValueError, match="PipelineConfig.schedule='gpipe'"):
        load_run_config(None, ["pipeline.schedule=gpipe"])
    with pytest.raises(ValueError, match="num_microbatches"):
        load_run_config(
            None,
            [
                "mesh.stage=4",
                "mesh.fsdp=1",
                "pipeline.schedule=dualpipe",
                "pipeline.microbatches=4",
            ],
        )
