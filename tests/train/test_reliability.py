"""Reliability of a run folder (issue 12): lock, settings, checksums, resume checks, start-up
errors, skipped steps. Everything here runs in-process or with a helper process that only takes
a lock; the end-to-end SIGTERM test is in test_reliability_loop.py."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.data import DataConfig, make_dataset
from deepseek_jax.data.sources import BadRecords, JsonlSource
from deepseek_jax.train.checkpoint import Checkpointer
from deepseek_jax.train.config import CheckpointConfig, load_run_config
from deepseek_jax.train.loop import main, run
from deepseek_jax.train.metrics import MetricsLogger
from deepseek_jax.train.resume import ConfigChangeError, check_resume
from deepseek_jax.train.runlock import RunLock, RunLockedError

TINY = [
    "model.preset=v3-tiny",
    "model.num_hidden_layers=2",
    "model.vocab_size=264",
    "model.remat=none",
    "data.tokenizer=null",
    "data.seq_len=32",
    "data.global_batch_size=8",
    "train.progress=false",
    "train.tensorboard=false",
    "train.log_every=1",
]

# The train-step tests below need only some step to compile: one MoE layer, no dense layer, no
# MTP (about half the compile time of TINY's model).
ONE_MOE_LAYER = [
    *TINY,
    "model.num_hidden_layers=1",
    "model.first_k_dense_replace=0",
    "model.num_nextn_predict_layers=0",
]


# ---- 1. run lock ---------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    from deepseek_jax.train.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
    lock.release()
    """
)


def _holder(folder):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another run: pid {holder.pid} "):
            RunLock(str(run_dir)).acquire()
        # The real entry point refuses too, before building anything, and exits non-zero.
        assert main([*TINY, f"train.run_dir={run_dir}", "train.steps=2"]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    RunLock(str(run_dir)).acquire().release()  # released when the holder exits


def test_stale_lock_of_a_killed_process_is_reported_and_taken_over(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()  # kill -9: no clean-up, the lock file still names it
    holder.wait(timeout=60)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with pytest.warns(RuntimeWarning, match=rf"stale lock of pid {holder.pid} .* taking it over"):
        lock = RunLock(str(tmp_path)).acquire()
    assert lock.stale["pid"] == holder.pid
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


# ---- 3. settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=nan", "TrainConfig.lr"),
        ("train.lr=.inf", "TrainConfig.lr"),
        ("train.clip_norm=nan", "TrainConfig.clip_norm"),
        ("train.eps=nan", "TrainConfig.eps"),
        ("train.step_factors=[0.3, nan]", "TrainConfig.step_factors"),
        ("model.rms_norm_eps=nan", "ModelConfig.rms_norm_eps"),
        ("model.capacity_factor=inf", "ModelConfig.capacity_factor"),
        ("model.initializer_range=nan", "ModelConfig.initializer_range"),
        ("loss.mtp_lambda=nan", "LossConfig.mtp_lambda"),
        ("loss.seq_balance_alpha=inf", "LossConfig.seq_balance_alpha"),
    ],
)
def test_non_finite_settings_are_rejected(override, field):
    with pytest.raises(ValueError, match=rf"{field}=.* must be finite"):
        load_run_config(None, [*TINY, override])


def test_seq_len_beyond_max_positions_is_an_error():
    with pytest.raises(ValueError, match=r"data.seq_len=512 exceeds model.max_position_embeddings"):
        load_run_config(None, [*TINY, "data.seq_len=512", "model.max_position_embeddings=256"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  steps: [1,\n", r"not valid YAML"),
        ("train: [steps, 3]\n", r"section 'train' must be a mapping"),
        ("train: 7\n", r"section 'train' must be a mapping"),
    ],
)
def test_malformed_yaml_is_a_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_run_config(str(path))
    with pytest.raises(SystemExit) as e:  # the command line: a usage error, no traceback
        main(["--config", str(path)])
    assert e.value.code == 2 and str(path) in capsys.readouterr().err


def test_malformed_override_is_a_clear_error():
    with pytest.raises(ValueError, match=r"override 'train.lr=\[1': the value is not valid YAML"):
        load_run_config(None, ["train.lr=[1"])


# ---- 3. a non-finite update is skipped, state unchanged ------------------------------------------
def test_non_finite_update_is_skipped_and_state_kept():
    from deepseek_jax.train.step import init_train_state, make_train_step

    cfg = load_run_config(None, ONE_MOE_LAYER)
    graphdef, state = init_train_state(cfg.model, cfg.train, seed=0)

    # A damaged second moment (negative, as after a flipped sign bit): loss and gradient are
    # finite, but Adam's update sqrt(nu) is NaN. The guard must look at what the update makes.
    def damage(s):
        if isinstance(s, optax.ScaleByAdamState):
            return s._replace(nu=jax.tree.map(lambda x: x - 1.0, s.nu))
        return s

    adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    state = state._replace(opt_state=jax.tree.map(damage, state.opt_state, is_leaf=adam))
    step = make_train_step(cfg.model, cfg.loss, cfg.train, graphdef, donate=False)
    batch = next(iter(make_dataset(cfg.data, process_index=0, process_count=1)))
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["finite"]) == 0.0 and int(new.skipped) == 1 and int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    chex.assert_trees_all_equal(new.biases, state.biases)


def test_consecutive_skips_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    from deepseek_jax.train.loop import TooManySkipsError

    cfg = load_run_config(
        None,
        [*ONE_MOE_LAYER, f"train.run_dir={tmp_path}", "train.steps=5", "train.warmup_steps=0"]
        + ["train.schedule=constant", "train.max_consecutive_skips=2", "checkpoint.every=1"],
    )
    # lr=nan cannot be configured any more (validated); force it to poison every update.
    object.__setattr__(cfg.train, "lr", float("nan"))
    with pytest.raises(TooManySkipsError, match=r"2 consecutive steps \(1..2\) were skipped"):
        run(cfg)
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["1"]  # saved after the first skip, never step 2
    meta = json.loads((ckpts / "1" / "meta" / "metadata").read_text())
    assert meta["step"] == 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [1, 2] and [r["finite"] for r in lines] == [0, 0]


# ---- 4. checksums --------------------------------------------------------------------------------
def _state(scale):
    rng = np.random.default_rng(int(scale))
    params = {"w": jnp.asarray(rng.standard_normal(2048), jnp.float32) * scale}
    params["b"] = jnp.full((3,), scale, jnp.bfloat16)
    opt = optax.adam(1e-3)
    return {"step": jnp.int32(scale), "params": params, "opt_state": opt.init(params)}


def _two_steps(directory, **kw):
    ckpt = Checkpointer(str(directory), CheckpointConfig(keep=5, **kw))
    ckpt.save(1, _state(1.0), {"batches": 1})
    ckpt.save(2, _state(2.0), {"batches": 2}, wait=True)
    ckpt.close()
    return Checkpointer(str(directory), CheckpointConfig(keep=5, **kw))


def _flip_a_bit(step_dir):
    """Flips one bit in the middle of the largest array file of a step (incompressible random
    floats, so the compressed chunk still decodes, to different values)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs]
    path = max((f for f in files if os.sep + "d" + os.sep in f), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))


def test_flipped_bit_is_detected_and_previous_step_used(tmp_path):
    ckpt = _two_steps(tmp_path)
    _flip_a_bit(tmp_path / "2")
    with pytest.warns(RuntimeWarning, match=r"step 2 .*checksum mismatch .*\['params'\]\['w'\]"):
        step, state, data = ckpt.restore(_state(0.0))
    assert step == 1 and data == {"batches": 1}
    chex.assert_trees_all_equal(state, _state(1.0))
    ckpt.close()


def test_flipped_bit_in_data_state_is_detected(tmp_path):
    ckpt = _two_steps(tmp_path)
    path = tmp_path / "2" / "data" / "process_0-of-1.json"
    path.write_text(path.read_text().replace('"batches": 2', '"batches": 3'))
    with pytest.warns(RuntimeWarning, match=r"data-iterator state does not match its checksum"):
        assert ckpt.restore(_state(0.0))[0] == 1
    ckpt.close()


def test_corrupt_folders_are_bounded(tmp_path):
    for round_ in range(3):
        ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=5, keep_corrupt=1))
        ckpt.save(1 + 2 * round_, _state(1.0), {})
        ckpt.save(2 + 2 * round_, _state(2.0), {}, wait=True)
        ckpt.close()
        _flip_a_bit(tmp_path / str(2 + 2 * round_))
        ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=5, keep_corrupt=1))
        with pytest.warns(RuntimeWarning):
            ckpt.restore(_state(0.0))
        ckpt.close()
    aside = sorted(p for p in os.listdir(tmp_path) if ".corrupt-" in p)
    assert len(aside) == 1 and aside[0].startswith("6.corrupt-")


def test_fallback_restore_prints_no_event_loop_noise(tmp_path, capfd):
    ckpt = _two_steps(tmp_path)
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            if name == "manifest.ocdbt":
                os.remove(os.path.join(root, name))
    with pytest.warns(RuntimeWarning, match="step 2"):
        assert ckpt.restore(_state(0.0))[0] == 1
    ckpt.close()
    captured = capfd.readouterr()
    assert "Event loop is closed" not in captured.out + captured.err


# ---- 5. start-up errors --------------------------------------------------------------------------
def test_checkpoint_dir_that_is_a_file_fails_at_start(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a folder")
    cfg = load_run_config(
        None, [*TINY, f"train.run_dir={tmp_path / 'run'}", f"checkpoint.dir={target}"]
    )
    with pytest.raises(NotADirectoryError, match=r"checkpoint.dir=.* is a file, not a folder"):
        run(cfg)


def test_dataset_of_empty_documents_fails_at_start(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n".join(json.dumps({"text": ""}) for _ in range(20)) + "\n")
    cfg = DataConfig(paths=(str(path),), tokenizer=None, seq_len=32, global_batch_size=2)
    with pytest.raises(ValueError, match=r"all 20 documents are empty"):
        make_dataset(cfg, process_index=0, process_count=1)


def test_bad_records_are_skipped_up_to_the_limit_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(6)]
    lines[2] = "{not json"
    lines[4] = json.dumps({"body": "no text field"})
    path.write_text("\n".join(lines) + "\n")
    strict = JsonlSource([path], "text")
    with pytest.raises(ValueError, match=r"docs.jsonl:3: not valid JSON"):
        strict[2]
    lenient = JsonlSource([path], "text", bad=BadRecords(1))
    with pytest.warns(RuntimeWarning, match=r"skipped bad record 1 .*docs.jsonl:3"):
        assert lenient[2] == ""
    assert lenient[2] == "" and lenient.bad.count == 1  # read again (next epoch): counted once
    assert lenient[5] == "doc 5"
    with pytest.raises(ValueError, match=r"docs.jsonl:5: no field 'text'.* more than DataConfig"):
        lenient[4]
    # Through the pipeline: batches come, and the bad lines are counted.
    cfg = DataConfig(
        paths=(str(path),), tokenizer=None, seq_len=8, global_batch_size=2, max_bad_records=100
    )
    with pytest.warns(RuntimeWarning, match="skipped bad record"):
        batch = next(iter(make_dataset(cfg, process_index=0, process_count=1)))
    assert batch["input_ids"].shape == (2, 8)


# ---- 6. resume compares the stored config --------------------------------------------------------
def test_resume_refuses_breaking_changes_and_logs_safe_ones(tmp_path, capsys):
    base = [*TINY, f"train.run_dir={tmp_path}"]
    old = load_run_config(None, [*base, "train.steps=4"])
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), old.checkpoint, {"config": old.to_dict()})
    ckpt.save(2, _state(1.0), {}, wait=True)
    ckpt.close()
    changed = ["data.global_batch_size=16", "model.num_experts_per_tok=3", "data.seq_len=64"]
    new = load_run_config(None, [*base, "train.steps=9", *changed])
    with pytest.raises(ConfigChangeError) as e:
        run(new)
    text = str(e.value)
    for line in ("data.global_batch_size: 8 -> 16", "data.seq_len: 32 -> 64"):
        assert line in text
    assert "model.num_experts_per_tok: 2 -> 3" in text and "train.steps" not in text
    assert main([*base, "train.steps=9", *changed]) == 1
    assert "--allow-config-change" in capsys.readouterr().err
    lines = check_resume(old.to_dict(), new.to_dict(), step=2, where="x", allow=True)
    assert "train.steps: 4 -> 9" in lines[0] and "BREAKING" in lines[1]
    safe = load_run_config(None, [*base, "train.steps=9", "train.lr=1e-3", "train.log_every=5"])
    [line] = check_resume(old.to_dict(), safe.to_dict(), step=2, where="x")
    assert "train.steps: 4 -> 9" in line and "train.lr" in line and "train.log_every" in line


def test_a_field_added_after_the_run_reads_as_its_default(tmp_path):
    """A run written before a config field existed (e.g. model.scan_layers, 2026-12-05) resumes
    when the new config keeps the field's default, and refuses a non-default value."""
    base = [*TINY, f"train.run_dir={tmp_path}", "model.scan_layers=true"]
    old = load_run_config(None, base).to_dict()
    del old["model"]["scan_layers"]
    assert check_resume(old, load_run_config(None, base).to_dict(), step=2, where="x") == []
    looped = load_run_config(None, [*base, "model.scan_layers=false"]).to_dict()
    with pytest.raises(ConfigChangeError, match=r"model.scan_layers: True -> False"):
        check_resume(old, looped, step=2, where="x")


# ---- 7. metrics.jsonl ----------------------------------------------------------------------------
def test_metrics_jsonl_never_holds_bare_nan(tmp_path):
    logger = MetricsLogger(str(tmp_path), total_steps=2, progress=False, tensorboard=False)
    logger.log(
        1, {"loss": np.float32("nan"), "grad_norm": np.inf, "dropped": np.array([1.0, np.nan])}
    )
    logger.close()

    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record["loss"] is None and record["grad_norm"] is None
    assert record["dropped"] == [1.0, None]


def test_tensorboard_writer_leaves_torch_unloaded(tmp_path):
    # tensorboardX imports torch when it can (1.2 s and ~190 MB per training process, torch
    # being installed here); the logger keeps it out, and the process can still import it.
    code = textwrap.dedent(
        f"""
        import sys
        from deepseek_jax.train.metrics import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r}, total_steps=1, progress=False)
        logger.log(1, {{"loss": 1.5, "expert_load": [[0.5, 0.5]]}})
        logger.close()
        assert "tensorboardX" in sys.modules and "torch" not in sys.modules
        import torch
        print("torch", torch.__version__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout
    [events] = os.listdir(tmp_path / "tb")
    assert (tmp_path / "tb" / events).stat().st_size > 0
