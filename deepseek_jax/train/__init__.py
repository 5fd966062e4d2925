"""The training system: run configs, optimizer, the jitted train step, checkpoints and the loop.

Example::

    from deepseek_jax.train import load_run_config, run

    cfg = load_run_config(None, ["train.steps=50"])   # configs/train-v3-small.yaml + overrides
    summary = run(cfg)

For custom loops (and sharded-vs-single-device tests), build the pieces directly::

    graphdef, state = init_train_state(model_cfg, train_cfg, seed=0, mesh=mesh, rules=rules)
    step = make_train_step(model_cfg, loss_cfg, train_cfg, graphdef, mesh=mesh, rules=rules)
    state, metrics = step(state, batch)               # batch: dict of int32 [B, T]
"""

from deepseek_jax.train.checkpoint import Checkpointer
from deepseek_jax.train.config import (
    CheckpointConfig,
    DistConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
)
from deepseek_jax.train.flops import flops_per_token, mfu, peak_flops
from deepseek_jax.train.loop import main, run
from deepseek_jax.train.metrics import MetricsLogger
from deepseek_jax.train.optimizer import lr_schedule, make_optimizer, weight_decay_mask
from deepseek_jax.train.step import (
    RunShapes,
    TrainState,
    abstract_train_state,
    init_train_state,
    make_train_step,
    train_state_shardings,
    update_biases,
)

__all__ = [
    "CheckpointConfig",
    "Checkpointer",
    "DistConfig",
    "MetricsLogger",
    "RunConfig",
    "RunShapes",
    "TrainConfig",
    "TrainState",
    "abstract_train_state",
    "flops_per_token",
    "init_train_state",
    "load_run_config",
    "lr_schedule",
    "main",
    "make_optimizer",
    "make_train_step",
    "mfu",
    "peak_flops",
    "run",
    "train_state_shardings",
    "update_biases",
    "weight_decay_mask",
]
