"""train.trainable=mtp: only the MTP modules learn; the main model stays bit-identical."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import RunShapes, init_train_state, make_train_step

B, T = 4, 16


def _batch(vocab):
    """Arithmetic progressions (t_{i+1} = t_i + 3 mod V): t_{i+2} is learnable from t_{i+1}."""
    start = np.arange(B)[:, None] * 7 + 5
    ids = ((start + 3 * np.arange(T + 1)[None, :]) % vocab).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "loss_mask": np.ones((B, T), np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    }


def test_only_mtp_learns_and_main_weights_are_bit_identical():
    # One MoE layer (no dense layer) under the MTP module: half the compile of two layers.
    cfg = load_preset("v3-tiny").replace(num_hidden_layers=1, first_k_dense_replace=0, remat="none")
    tcfg = TrainConfig(
        steps=40, lr=1e-2, warmup_steps=0, schedule="constant", bias_update_speed=0.0,
        trainable="mtp",
    )  # fmt: skip
    graphdef, state0 = init_train_state(cfg, tcfg, seed=0)
    step = make_train_step(cfg, LossConfig(), tcfg, graphdef, donate=False)
    batch = _batch(cfg.vocab_size)
    state, losses, main = state0, [], []
    for _ in range(25):
        state, m = step(state, batch)
        losses.append(float(m["mtp_loss"]))
        main.append(float(m["main_loss"]))
    assert losses[-1] < losses[0] - 1.0, losses  # the MTP loss falls by > 1 nat
    assert main[-1] == main[0]  # the main model's predictions did not move
    mask = RunShapes.build(cfg, tcfg).train_mask
    assert all(jax.tree.leaves(mask["mtp"])) and not any(
        jax.tree.leaves({k: v for k, v in mask.items() if k != "mtp"})
    )
    trained = jax.tree.leaves(mask)
    pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params), trained, strict=True)
    for new, old, train in pairs:
        if not train:
            np.testing.assert_array_equal(new, old)  # bit-identical
        else:
            assert np.any(new != old)
    chex.assert_trees_all_equal(state.biases, state0.biases)


def test_trainable_config_errors_name_the_field():
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="head")
    with pytest.raises(ValueError, match="bias_update_speed"):
        TrainConfig(trainable="mtp", bias_update_speed=0.001)


@pytest.mark.slow
def test_init_from_a_run_then_train_only_mtp(tmp_path):
    """train.init_from loads a run's weights; a trainable=mtp run then leaves them as they were
    everywhere but in the MTP modules (through train_main's loop and checkpoints)."""
    from deepseek_jax.inference.cli import load_run
    from deepseek_jax.train.config import load_run_config
    from deepseek_jax.train.loop import run

    base = [
        "model.preset=v3-tiny", "model.num_hidden_layers=1", "model.first_k_dense_replace=0",
        "model.vocab_size=264",
        "model.remat=none", "data.tokenizer=null", "data.seq_len=32",
        "data.global_batch_size=8", "mesh.rules=dp", "train.steps=1", "train.progress=false",
        "train.data_layout=global", "train.tensorboard=false",
    ]  # fmt: skip
    run(load_run_config(None, base + [f"train.run_dir={tmp_path / 'a'}"]))
    extra = [
        f"train.run_dir={tmp_path / 'b'}", f"train.init_from={tmp_path / 'a'}",
        "train.trainable=mtp", "train.bias_update_speed=0", "train.lr=1e-2",
    ]  # fmt: skip
    run(load_run_config(None, base + extra))
    a, _, _ = load_run(tmp_path / "a")
    b, _, _ = load_run(tmp_path / "b")
    from flax import nnx

    pa, pb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
    mtp_a, mtp_b = pa.pop("mtp"), pb.pop("mtp")
    chex.assert_trees_all_equal(pa, pb)
    assert any(
        np.any(x != y) for x, y in zip(jax.tree.leaves(mtp_a), jax.tree.leaves(mtp_b), strict=True)
    )


def test_mtp_self_distillation_loss_by_hand():
    """loss.mtp_distill=w: depth k at position i learns (1-w) * CE(t_{i+k+1}) + w * CE(p_main at
    position i+k), checked against a numpy loop."""
    from deepseek_jax.losses import LossConfig, lm_loss
    from deepseek_jax.model import ModelOutput

    rng = np.random.default_rng(0)
    B, T, V, w = 2, 6, 5, 0.7
    logits, mtp = rng.normal(size=(B, T, V)), rng.normal(size=(1, B, T, V))
    labels = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), np.int32)
    mask[0, 4] = 0
    out = ModelOutput(jnp.asarray(logits), jnp.asarray(mtp), None)
    batch = {"labels": jnp.asarray(labels), "loss_mask": jnp.asarray(mask)}
    _, m = lm_loss(out, batch, LossConfig(mtp_distill=w))

    def log_softmax(x):
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    total, n = 0.0, 0
    for b in range(B):
        for i in range(T - 1):
            if mask[b, i] and mask[b, i + 1]:
                logq = log_softmax(mtp[0, b, i])
                hard = -logq[labels[b, i + 1]]
                soft = -(np.exp(log_softmax(logits[b, i + 1])) * logq).sum()
                total, n = total + (1 - w) * hard + w * soft, n + 1
    np.testing.assert_allclose(float(m["mtp_loss"]), total / n, rtol=1e-5)
    with pytest.raises(ValueError, match="mtp_distill"):
        LossConfig(mtp_distill=1.5)
