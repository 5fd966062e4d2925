"""Every notebook in notebooks/ executes top to bottom (its cells carry their own asserts).

DEEPSEEK_JAX_NB_SMALL=1 makes each notebook run at its reduced size (the kernel inherits the
environment); one test per notebook so that xdist can spread them.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from deepseek_jax.testing import xla_flags_for_tests

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for n in (
        "01_model_tour",
        "02_checkpoints",
        "03_pretraining",
        "04_generation",
        "05_speculative",
        "06_post_training",
        "07_scale",
    ):
        assert f"{n}.ipynb" in names, n


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    # The notebooks plot: matplotlib (the `plot` extra) comes with the `test` extra.
    monkeypatch.setenv("DEEPSEEK_JAX_NB_SMALL", "1")
    # Compile-bound at the reduced size: the kernel (and any run it starts) compiles at XLA's
    # LLVM optimisation level 0, as the test processes do (tests/conftest.py): worker-seconds for
    # the eight notebooks 229 -> 183 alone, 239 -> 186 in the whole suite; asserts unchanged.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    # as on Colab: one CPU device (the suite's 8 emulated devices are for the sharding tests;
    # 07_scale adds its own before importing jax), and the suite's faster code generation
    monkeypatch.setenv("XLA_FLAGS", xla_flags_for_tests())
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert "reduced size (CI)" in "".join(
        o.get("text", "") for o in nb.cells[1].get("outputs", [])
    )  # the install cell ran and saw the reduced size
