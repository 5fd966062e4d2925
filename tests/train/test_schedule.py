"""V3's schedules in tokens (issue 11 items 6-7): learning rate, batch-size ramp, run configs."""

import json
import math
import os

import numpy as np
import pytest

from deepseek_jax.config import PRESET_DIR
from deepseek_jax.data import DataConfig, make_dataset
from deepseek_jax.data.ramp import batch_plan
from deepseek_jax.train.config import load_run_config
from deepseek_jax.train.optimizer import lr_schedule


def _run(name):
    return load_run_config(os.path.join(PRESET_DIR, f"train-v3-671b-{name}.yaml"))


def _simulate(start, end, inc, ramp, T, steps):
    """The ramp rule step by step: start + inc floor((end - start) min(t, R) / (R inc))."""
    sizes, seen, out = [], 0, []
    for _ in range(steps):
        b = start + inc * math.floor((end - start) * min(seen, ramp) / (ramp * inc))
        out.append((b, seen))
        seen += b * T
        sizes.append(b)
    return out


def test_batch_plan_matches_the_rule_step_by_step():
    data = DataConfig(seq_len=8, global_batch_size=12, batch_ramp_start=3, batch_ramp_tokens=1000.0)
    plan = batch_plan(data)
    for step, (b, seen) in enumerate(_simulate(3, 12, 3, 1000.0, 8, 80)):
        assert plan.batch_at(step) == b, step
        assert plan.tokens_before(step) == seen, step
        assert float(plan.tokens_before_jnp(step)) == seen
    assert plan.batch_sizes == (3, 6, 9, 12)


def _v3_lr_by_tokens(t):
    """V3 Sec. 4.2 as a function of tokens seen (after warm-up)."""
    if t < 10e12:
        return 2.2e-4
    if t < 14.3e12:
        p = (t - 10e12) / 4.3e12
        return 2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi * p))
    return 2.2e-5 if t < 14.633e12 else 7.3e-6


def test_671b_run_config_follows_the_report():
    cfg = _run("pretrain")
    plan = batch_plan(cfg.data)
    # 3072 -> 15360 sequences over 469B tokens, 14.8T tokens in all
    assert plan.batch_at(0) == 3072
    assert plan.batch_at(plan.step_at(469e9)) == 15360
    assert plan.batch_at(plan.step_at(469e9) - 1) < 15360
    assert plan.tokens_before(cfg.train.steps) == pytest.approx(14.8e12, rel=1e-5)
    lr = lr_schedule(cfg.train, cfg.data)
    assert float(lr(0)) == pytest.approx(2.2e-4 / 2000, rel=1e-5)  # warm-up over 2K steps
    assert float(lr(1999)) == pytest.approx(2.2e-4, rel=1e-6)
    for t in (1e12, 9.99e12, 10.5e12, 12.15e12, 14e12, 14.4e12, 14.7e12, 14.799e12):
        step = plan.step_at(t)
        seen = plan.tokens_before(step)  # the first step at or past t
        assert float(lr(step)) == pytest.approx(_v3_lr_by_tokens(seen), rel=2e-4), t
    assert float(lr(cfg.train.steps - 1)) == pytest.approx(7.3e-6, rel=1e-6)
    # the rest of Sec. 4.1-4.2 in the same file
    assert cfg.model.rope_scaling is None and cfg.data.seq_len == 4096
    assert cfg.data.document_masking is False and cfg.model.moe_impl == "dropless"
    assert cfg.train.bias_update_stop_tokens == 14.3e12 and cfg.train.mtp_lambda_late == 0.1


@pytest.mark.parametrize(
    "name, seq_len, batch", [("ext-32k", 32768, 1920), ("ext-128k", 131072, 480)]
)
def test_context_extension_run_configs(name, seq_len, batch):
    cfg = _run(name)  # V3 Sec. 4.3: 1000 steps each, lr 7.3e-6, YaRN s=40 alpha=1 beta=32
    rs = cfg.model.rope_scaling
    assert (rs.factor, rs.beta_slow, rs.beta_fast, rs.original_max_position_embeddings) == (
        40,
        1,
        32,
        4096,
    )
    assert (cfg.data.seq_len, cfg.data.global_batch_size) == (seq_len, batch)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.schedule) == (1000, 7.3e-6, "constant")
    assert float(lr_schedule(cfg.train, cfg.data)(500)) == pytest.approx(7.3e-6)


def test_token_boundaries_need_the_data_config():
    cfg = _run("pretrain")
    with pytest.raises(ValueError, match="decay_start_tokens"):
        lr_schedule(cfg.train)(0)
    # the optimizer state itself needs no schedule: a train state initialises without the data
    from deepseek_jax.config import load_preset
    from deepseek_jax.train.step import abstract_train_state

    abstract_train_state(load_preset("v3-tiny"), cfg.train)


def test_pipeline_follows_the_ramp(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "z" * (5 + i % 9)}) + "\n" for i in range(40)))
    data = DataConfig(
        paths=(str(path),),
        tokenizer=None,
        seq_len=16,
        global_batch_size=6,
        batch_ramp_start=2,
        batch_ramp_tokens=100.0,
        shuffle=False,
        read_threads=0,
        packing_bins=2,
    )
    plan = batch_plan(data)
    it = iter(make_dataset(data, process_index=0, process_count=1))
    shapes = [next(it)["input_ids"].shape for _ in range(8)]
    assert [s[0] for s in shapes] == [plan.batch_at(i) for i in range(8)]
    assert shapes[0][0] == 2 and shapes[-1][0] == 6
    # a restored iterator replays the same sizes and rows
    it2 = iter(make_dataset(data, process_index=0, process_count=1))
    next(it2), next(it2)
    state = it2.get_state()
    a = [next(it2) for _ in range(3)]
    it3 = iter(make_dataset(data, process_index=0, process_count=1))
    it3.set_state(state)
    for x, y in zip(a, [next(it3) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_ramp_config_errors_name_the_field():
    with pytest.raises(ValueError, match="DataConfig.batch_ramp_start"):
        DataConfig(global_batch_size=10, batch_ramp_start=3, batch_ramp_tokens=1.0)
    with pytest.raises(ValueError, match="DataConfig.batch_ramp_tokens"):
        DataConfig(global_batch_size=9, batch_ramp_start=3)


def test_training_follows_the_ramp_end_to_end(tmp_path):
    """`train_main.py`'s loop on a ramp: each step trains the planned global batch, the lr follows
    the token-based schedule of that plan, and the steps that compile a new size are left out of
    the throughput (their time is compilation, not training)."""
    from deepseek_jax.train.loop import run

    overrides = [
        "model.preset=v3-tiny",
        "model.num_hidden_layers=2",
        "model.vocab_size=264",
        "model.num_nextn_predict_layers=0",
        "model.remat=none",
        "data.tokenizer=null",
        "data.seq_len=16",
        "data.global_batch_size=16",
        "data.batch_ramp_start=8",
        "data.batch_ramp_increment=8",
        "data.batch_ramp_tokens=256",
        "mesh.rules=dp",
        "train.steps=5",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.progress=false",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    cfg = load_run_config(None, overrides)
    run(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    plan = batch_plan(cfg.data)
    sizes = [plan.batch_at(i) for i in range(5)]
    assert sizes == [8, 8, 16, 16, 16]
    assert [r["sequences"] for r in records] == sizes
    assert all(math.isfinite(r["loss"]) for r in records)
    schedule = lr_schedule(cfg.train, cfg.data)
    np.testing.assert_allclose(
        [r["lr"] for r in records], [float(schedule(i)) for i in range(5)], rtol=1e-6
    )
    # step 1 and step 3 (the first at 16 rows) compile: no rate for them, a rate for the others
    assert [("tokens_per_s" in r) for r in records] == [False, True, False, True, True]
