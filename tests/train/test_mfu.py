"""Honest MFU on CPU (issue 11 item 2): the peak comes from the machine, MFU never exceeds 100%,
tokens/s counts non-padding tokens."""

import json
import os

import jax
import numpy as np
import pytest

from deepseek_jax.train import flops
from deepseek_jax.train.flops import (
    calibrate_cpu_matmul,
    cpu_peak,
    cpu_vector_peak,
    describe_peak,
    mfu,
)


def test_vector_peak_from_cpuinfo():
    info = {"flags": "fpu sse avx2 fma avx512f", "cpu MHz": "2000.0"}
    value, how = cpu_vector_peak(info, cores=2)
    assert value == 2 * 16 * 2 * 2 * 2.0e9  # cores x lanes x FMA units x 2 FLOPs x clock
    assert "cpuinfo" in how
    assert cpu_vector_peak({"flags": "avx2"}, cores=2) is None  # no clock: unknown


@pytest.mark.parametrize(
    "family, model, flags, lanes",
    [
        ("25", "17", "avx2 fma avx512f", 8),  # Zen 4: AVX-512 as two 256-bit halves
        ("25", "1", "avx2 fma", 8),  # Zen 3
        ("23", "1", "avx2 fma", 4),  # Zen: 128-bit FMA units
        ("23", "49", "avx2 fma", 8),  # Zen 2
        ("26", "2", "avx2 fma avx512f", 16),  # Zen 5: a full 512-bit datapath
    ],
)
def test_vector_peak_counts_amd_fma_width(family, model, flags, lanes):
    info = {"vendor_id": "AuthenticAMD", "cpu family": family, "model": model}
    value, how = cpu_vector_peak({**info, "flags": flags, "cpu MHz": "2000.0"}, cores=1)
    assert value == lanes * 2 * 2 * 2.0e9
    assert f"{lanes} fp32 lanes" in how


def test_cpu_peak_is_at_least_a_measured_matmul(tmp_path):
    cache = str(tmp_path / "peak.json")
    value, how = cpu_peak(cache=cache)
    # The peak is at least the calibration this process measured, and not the nominal 1e11 per
    # device that a plain fp32 matmul beat ~3x (~280% MFU, issue 11). Against a matmul timed
    # here only within 2x: beside the other test worker, the calibration (best of 5 [1024]^2
    # products) can land in a busy moment that a shorter product misses (seen: 350 vs 399
    # GFLOP/s), and a boosting CPU outruns its cpuinfo bound (332 vs 382 GFLOP/s). The cache
    # keeps the best calibration across processes for that.
    if "measured now" in how:
        assert value == flops._calibration()
    assert value >= calibrate_cpu_matmul(n=512, repeats=3) * 0.5, (value, how)
    assert value != 1e11
    assert how  # the log says which source
    again, how2 = cpu_peak(cache=cache)
    assert again == value  # the process measures once
    if "calibration" in how:
        assert "kept in" in how2


def test_cpu_peak_keeps_the_best_calibration(tmp_path, monkeypatch):
    # A calibration taken while the machine was busy never lowers the peak, and a faster one
    # replaces a slower one kept from before (issue 13: a cached 104 GF/s on a 200 GF/s machine).
    monkeypatch.setattr(flops, "_cpuinfo", lambda: {"model name": "test cpu"})  # no vector bound
    cache = str(tmp_path / "peak.json")
    key = f"test cpu|{flops._cores()}"
    monkeypatch.setattr(flops, "_calibration", lambda: 2e11)
    assert cpu_peak(cache=cache)[0] == 2e11
    monkeypatch.setattr(flops, "_calibration", lambda: 1e11)
    value, how = cpu_peak(cache=cache)
    assert value == 2e11 and "best kept in" in how
    monkeypatch.setattr(flops, "_calibration", lambda: 3e11)
    assert cpu_peak(cache=cache)[0] == 3e11
    assert json.load(open(cache)) == {key: 3e11}


def test_cpu_peak_ignores_an_impossible_calibration(tmp_path, monkeypatch):
    # A matmul on another process's device never runs here and "took" microseconds: 949 TFLOP/s
    # on a 2-core VM, once kept as the machine's best (MFU 0.01%). Beyond MAX_BOOST x the vector
    # bound a calibration is neither used nor kept, and a kept one is ignored.
    info = {"flags": "avx2 fma", "cpu MHz": "2000.0", "model name": "test cpu"}
    monkeypatch.setattr(flops, "_cpuinfo", lambda: info)
    monkeypatch.setattr(flops, "_cores", lambda: 1)
    vector = 8 * 2 * 2 * 2.0e9
    cache = str(tmp_path / "peak.json")
    monkeypatch.setattr(flops, "_calibration", lambda: 9.5e14)
    value, how = cpu_peak(cache=cache)
    assert value == vector and "cpuinfo" in how
    assert not os.path.exists(cache)
    json.dump({"test cpu|1": 9.5e14}, open(cache, "w"))
    monkeypatch.setattr(flops, "_calibration", lambda: 1.5 * vector)  # turbo: believable
    value, how = cpu_peak(cache=cache)
    assert value == 1.5 * vector and "measured now, kept" in how
    assert json.load(open(cache)) == {"test cpu|1": 1.5 * vector}


def test_a_failed_cache_write_keeps_the_old_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(flops, "_cpuinfo", lambda: {"model name": "test cpu"})
    cache = tmp_path / "peak.json"
    old = {"other cpu|4": 1e11, f"test cpu|{flops._cores()}": 1e11}
    cache.write_text(json.dumps(old))

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(flops, "_calibration", lambda: 2e11)
    monkeypatch.setattr(json, "dump", fail)
    value, how = cpu_peak(cache=str(cache))
    assert value == 2e11 and "cache not writable" in how
    assert json.loads(cache.read_text()) == old  # whole, as before
    assert os.listdir(tmp_path) == ["peak.json"]  # no temporary file left


def test_calibration_runs_on_a_device_of_this_process(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a, **k: pytest.fail("may be another process's"))
    assert flops.calibrate_cpu_matmul(n=128, repeats=1) > 0


def test_describe_peak_splits_the_machine_over_cpu_devices():
    per_device, how = describe_peak(jax.devices("cpu")[0])
    machine, _ = cpu_peak()
    assert per_device == pytest.approx(machine / jax.local_device_count("cpu"))
    assert "CPU machine peak" in how


def test_mfu_never_above_one():
    assert mfu(1e6, 1e6, 1, 1e11) == 1.0
    assert mfu(1e3, 1e6, 2, 1e11) == pytest.approx(1e9 / 2e11)


def test_cpu_peak_without_clock_or_calibration_is_an_error(monkeypatch):
    monkeypatch.setattr(flops, "_cpuinfo", lambda: {})
    with pytest.raises(ValueError, match="peak_flops"):
        cpu_peak(cache=None, calibrate=False)


def test_real_token_rate_excludes_padding():
    from deepseek_jax.train.metrics import real_tokens, token_rates

    mask = np.ones((2, 4), np.int32)
    mask[1, 2:] = 0  # two padding positions
    batch = {"input_ids": np.zeros((2, 4), np.int32), "loss_mask": mask}
    assert real_tokens(batch) == (6.0, 8.0)
    assert real_tokens(batch, scale=2) == (12.0, 16.0)
    rates = token_rates(3 * 6.0, 3 * 8.0, seconds=2)
    assert rates["tokens_per_s"] == pytest.approx(3 * 6 / 2)
    assert rates["positions_per_s"] == pytest.approx(3 * 8 / 2)
    assert "positions_per_s" not in token_rates(8.0, 8.0, 1)  # both only where they differ


def test_log_line_says_how_many_assignments_are_dropped():
    from deepseek_jax.train.loop import _log_line

    r = {"loss": 1.0, "main_loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "dropped_mean": 0.0123}
    assert "dropped 1.23%" in _log_line(10, r)
    assert "dropped" not in _log_line(10, r | {"dropped_mean": 0.0})  # dropless: nothing to say
