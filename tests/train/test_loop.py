"""The training loop end to end, in subprocesses: exact resume after kill -9 and after SIGTERM,
and a 2-process x 4-device run equal to the 1-process x 8-device one.

All runs train a tiny V3 of one MoE layer (MLA, MoE) and its MTP module on the shipped corpus with
byte tokens, and share a persistent compilation cache so that only the first run of each topology
compiles.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax.testing import xla_flags_for_tests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
OVERRIDES = [
    "model.preset=v3-tiny",
    "model.num_hidden_layers=1",
    "model.first_k_dense_replace=0",  # no dense layer: less to compile
    "model.vocab_size=264",
    "model.remat=none",
    "data.tokenizer=null",
    "data.seq_len=32",
    "data.global_batch_size=8",
    "mesh.rules=dp",
    f"train.steps={STEPS}",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.schedule=cosine",
    "train.log_every=1",
    "train.progress=false",
    "train.data_layout=global",
]

# Runs the loop; TEST_HOOK = {"step": s, "signal": name, "wait_for": folder} sends the signal to
# itself after step s, once the folder (a committed checkpoint) exists.
CHILD = r"""
import json, os, signal, sys, time
from deepseek_jax.train.config import load_run_config
from deepseek_jax.train.loop import run

spec = json.loads(os.environ.get("TEST_HOOK") or "{}")

def hook(step):
    if step != spec.get("step"):
        return
    deadline = time.time() + 300
    while spec.get("wait_for") and not os.path.isdir(spec["wait_for"]):
        if time.time() > deadline:
            sys.exit("timed out waiting for " + spec["wait_for"])
        time.sleep(0.05)
    os.kill(os.getpid(), getattr(signal, spec["signal"]))

run(load_run_config(None, sys.argv[1:]), on_step=hook if spec else None)
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _launch(args, cache_dir, *, devices=8, hook=None, extra_env=None):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        XLA_FLAGS=xla_flags_for_tests(devices),
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # compile-bound; the runs are compared with each other
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        TEST_HOOK=json.dumps(hook or {}),
        **(extra_env or {}),
    )
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *OVERRIDES, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _losses(run_dir):
    """step -> every logged loss of that step, in file order (a resumed run appends)."""
    seen: dict[int, list[float]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            seen.setdefault(r["step"], []).append(r["loss"])
    return seen


def _tb_histograms(folder):
    """(tag, step) -> number of values of every histogram in the TensorBoard event files."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for name in os.listdir(folder):
        data, i = open(os.path.join(folder, name), "rb").read(), 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                if v.HasField("histo"):
                    out[(v.tag, event.step)] = v.histo.num
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    run_dir = str(tmp_path_factory.mktemp("reference"))
    code, out = _finish(_launch([f"train.run_dir={run_dir}", "checkpoint.every=0"], cache_dir))
    assert code == 0, out
    return run_dir, out


@pytest.mark.slow
def test_reference_run_writes_metrics(reference):
    run_dir, out = reference
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    for key in (
        "step",
        "loss",
        "main_loss",
        "mtp_loss",
        "seq_balance_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "expert_load_max",
        "expert_load_min",
        "dropped",
        "expert_load",
        "skipped",
    ):
        assert key in record, key
    assert len(record["expert_load_max"]) == 2  # the MoE layer and the MTP block
    load = np.array(record["expert_load"])  # [L, E] shares of each layer's assignments
    assert load.shape == (2, 8)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(load.max(-1) * 8, record["expert_load_max"], rtol=1e-6)
    histograms = _tb_histograms(os.path.join(run_dir, "tb"))
    assert histograms[("moe/expert_load/layer_1", STEPS)] == 8  # one value per expert
    assert record["loss"] < _losses(run_dir)[1][0]
    assert os.listdir(os.path.join(run_dir, "tb"))  # TensorBoard event file
    assert "run finished" in out and os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == [str(STEPS)]  # the final save


@pytest.mark.slow
def test_exact_resume_after_kill_and_sigterm(reference, tmp_path, cache_dir):
    ref = {s: v[0] for s, v in _losses(reference[0]).items()}
    run_dir = str(tmp_path / "run")
    ckpt = os.path.join(run_dir, "checkpoints")
    args = [f"train.run_dir={run_dir}", "checkpoint.every=3"]
    # 1. kill -9 after step 4, once the async checkpoint of step 3 is committed.
    hook = {"step": 4, "signal": "SIGKILL", "wait_for": os.path.join(ckpt, "3")}
    code, out = _finish(_launch(args, cache_dir, hook=hook))
    assert code == -signal.SIGKILL, out
    assert sorted(os.listdir(ckpt)) == ["3"]
    # 2. resume from 3; SIGTERM after step 5 saves step 5 and exits cleanly.
    code, out = _finish(_launch(args, cache_dir, hook={"step": 5, "signal": "SIGTERM"}))
    assert code == 0, out
    assert "resumed from step 3" in out and "received SIGTERM" in out
    assert sorted(os.listdir(ckpt)) == ["3", "5"]
    # 3. resume from 5 to the end.
    code, out = _finish(_launch(args, cache_dir))
    assert code == 0, out
    assert "resumed from step 5" in out
    losses = _losses(run_dir)
    assert [len(losses[s]) for s in range(1, STEPS + 1)] == [1, 1, 1, 2, 1, 1]  # 4 ran twice
    for step, values in losses.items():
        assert values == [ref[step]] * len(values), (step, values, ref[step])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(reference, tmp_path, cache_dir):
    ref = {s: v[0] for s, v in _losses(reference[0]).items()}
    run_dir = str(tmp_path / "multi")
    port = _free_port()
    procs = [
        _launch(
            [
                f"train.run_dir={run_dir}",
                "checkpoint.every=0",
                f"dist.coordinator=127.0.0.1:{port}",
                "dist.num_processes=2",
                f"dist.process_id={i}",
            ],
            cache_dir,
            devices=4,
        )
        for i in range(2)
    ]
    results = [_finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out
    assert "mesh {'data': 1, 'fsdp': 8" in results[0][1] and "2 process(es)" in results[0][1]
    losses = {s: v[-1] for s, v in _losses(run_dir).items()}
    assert sorted(losses) == sorted(ref)
    # Same global batches and math; only the cross-process reduction order may differ.
    np.testing.assert_allclose([losses[s] for s in ref], list(ref.values()), rtol=1e-5)
    final = os.path.join(run_dir, "checkpoints", str(STEPS), "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(final))
