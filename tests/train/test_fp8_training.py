"""FP8 training (V3 Sec. 3.3): the small preset trained in FP8 and in BF16 from the same seed on
the shipped corpus; the FP8 loss stays within 1% (relative) of the BF16 loss."""

import itertools

import numpy as np
import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.data import DataConfig, make_dataset
from deepseek_jax.losses import LossConfig
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state, make_train_step

STEPS, SEQ, BATCH = 200, 64, 4


def _losses(fp8: bool) -> np.ndarray:
    cfg = load_preset("v3-small").replace(
        dtype="bfloat16", fp8=fp8, remat="none", moe_impl="dropless"
    )
    tcfg = TrainConfig(
        steps=STEPS, lr=2e-3, warmup_steps=20, schedule="cosine", bias_update_speed=0.01
    )
    graphdef, state = init_train_state(cfg, tcfg, seed=0)
    step = make_train_step(cfg, LossConfig(), tcfg, graphdef)
    data = make_dataset(
        DataConfig(seq_len=SEQ, global_batch_size=BATCH, seed=0), process_index=0, process_count=1
    )
    losses = []
    for batch in itertools.islice(iter(data), STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["main_loss"]))
    return np.array(losses)


@pytest.mark.slow
def test_fp8_loss_tracks_bf16():
    bf16, fp8 = _losses(False), _losses(True)
    assert bf16[-20:].mean() < bf16[:10].mean() - 1.0  # it trained
    rel = abs(fp8[-20:].mean() - bf16[-20:].mean()) / bf16[-20:].mean()
    print(f"final loss bf16 {bf16[-20:].mean():.4f} fp8 {fp8[-20:].mean():.4f} rel {rel:.4%}")
    assert rel < 0.01
    assert not np.array_equal(bf16, fp8)  # the FP8 path really differs
