"""Converter reliability (issue 12): a missing Orbax chunk fails every reader naming the array
and chunk and leaves no output (a corrupt one names the array); stale temporary folders of
killed runs are removed; outputs get ordinary permissions."""

import gc
import os
import re
import subprocess
import sys
import warnings

import pytest

from deepseek_jax.convert import hf_to_orbax, orbax_to_hf
from deepseek_jax.hf import CheckpointWarning, load_pretrained
from deepseek_jax.hf.safetensors_io import CheckpointError


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        yield


def _dead_pid() -> int:
    code = "import os; print(os.getpid())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True).stdout)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_missing_chunk_fails_every_reader_and_leaves_no_output(tiny_ckpts, tmp_path, capfd):
    v3 = tiny_ckpts.get("v3")[0]
    orb = hf_to_orbax(v3, tmp_path / "orbax", progress=False)
    array = "moe_layers.ffn.w_gate"  # chunked 1 along the layer and expert axes
    chunks = sorted(f for f in os.listdir(os.path.join(orb, array)) if not f.startswith("."))
    missing = chunks[len(chunks) // 2]
    os.remove(os.path.join(orb, array, missing))
    chunk = "{" + missing.replace(".", ", ") + "}"
    with pytest.raises(CheckpointError, match=rf"Orbax array '{array}'.*chunk {chunk}.* missing"):
        orbax_to_hf(orb, tmp_path / "hf", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["orbax"]  # no output, no temporary folder
    capfd.readouterr()
    # Found before any read starts: one clear error, none of the abandoned reads' tracebacks.
    with pytest.raises(CheckpointError, match=rf"Orbax array '{array}': chunk {chunk}.* missing"):
        load_pretrained(orb)
    gc.collect()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err


# A fresh process, so that whatever the abandoned reads print before it exits is seen (pytest
# catches unraisable exceptions itself, where a user's process prints them to stderr).
_LOAD_CORRUPT = """
import gc, sys, time
from deepseek_jax.hf import load_pretrained
from deepseek_jax.hf.safetensors_io import CheckpointError
try:
    load_pretrained(sys.argv[1])
except CheckpointError as e:
    print(e)
for _ in range(5):  # the other arrays' reads finish and their coroutines are collected
    gc.collect()
    time.sleep(0.2)
"""


def test_corrupt_chunk_error_names_the_array_and_nothing_else_is_printed(tiny_ckpts, tmp_path):
    orb = hf_to_orbax(tiny_ckpts.get("v3")[0], tmp_path / "orbax", progress=False)
    array = "moe_layers.ffn.w_gate"
    chunk = sorted(f for f in os.listdir(os.path.join(orb, array)) if not f.startswith("."))[1]
    with open(os.path.join(orb, array, chunk), "wb") as f:
        f.write(b"not zstd")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _LOAD_CORRUPT, orb],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"Orbax array '{array}': .*{array}/{chunk}", proc.stdout), proc.stdout
    # The reads of the other arrays, abandoned by Orbax, used to print dozens of "Exception
    # ignored in ..." tracebacks ("Event loop is closed", unfinished shard-read coroutines).
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_stale_temporary_folders_are_cleaned_and_outputs_are_not_private(tiny_ckpts, tmp_path):
    v2 = tiny_ckpts.get("v2_lite")[0]
    dead = _dead_pid()
    stale = tmp_path / f".orbax.tmp-{dead}-abc123"  # what kill -9 of a conversion leaves
    os.makedirs(stale / "embed")
    live = tmp_path / f".orbax.tmp-{os.getpid()}-xyz"  # a running conversion's: kept
    os.makedirs(live)
    orb = hf_to_orbax(v2, tmp_path / "orbax", progress=False)
    assert not stale.exists() and live.exists()
    out = orbax_to_hf(orb, tmp_path / "hf", progress=False)
    for folder in (orb, out):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~_umask(), folder
