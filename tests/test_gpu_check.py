"""bench/gpu_check.py on CPU at toy sizes: every row is produced and the correctness rows pass.

The numbers mean nothing on CPU (Pallas runs interpreted); this proves the one-shot GPU script
runs end to end, compares the kernels with their references and degrades cleanly without
jax-triton or a GPU, so that a lent GPU's minutes are not spent debugging it.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, BENCH)
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(BENCH)


def test_smoke_run_checks_kernels_and_decodes(gpu_check, tmp_path):
    out = tmp_path / "table.md"
    table = gpu_check.main(["--smoke", "--sections", "correctness", "decode", "--out", str(out)])
    assert out.read_text().strip() == table.strip()
    rows = [
        line.split(" | ")
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:]
    checks = {r[0].lstrip("| "): r[-1].rstrip(" |") for r in rows}
    for name in (
        "fp8 matmul pallas (interpreted) fwd",
        "fp8 linear pallas (interpreted) fwd / dx / dw",
        "grouped gemm bf16 pallas (interpreted) fwd / dx / dw",
        "grouped gemm fp8 pallas (interpreted) fwd / dx / dw",
    ):
        assert checks[name] == "PASS", table
    # No GPU here (and jax-triton, when absent): the triton row is a skip naming the reason.
    assert checks["fp8 matmul triton vs reference"] == "SKIP"
    if importlib.util.find_spec("jax_triton") is None:
        assert "jax_triton" in table
    assert any(k.startswith("v3-tiny decode") for k in checks), table
    assert "error" not in table


def test_full_run_refuses_a_cpu_and_shell_wrapper_parses(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["--sections", "decode"])
    subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_check.sh")], check=True)
