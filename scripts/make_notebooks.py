"""Writes notebooks/ (rerun after changing their cells; the test suite executes them).

    python scripts/make_notebooks.py

Every notebook starts with an install cell that does nothing where `deepseek_jax` already
imports (a checkout with `pip install -e ".[plot]"`, CI) and otherwise, e.g. on a fresh Colab
runtime, installs the package with its `plot` extra from the repository: the URL is
`[project.urls] Repository` of pyproject.toml (else this checkout's `origin` remote), and the
environment variable DEEPSEEK_JAX_REPO overrides it. Each notebook reads DEEPSEEK_JAX_NB_SMALL=1
(set by tests/test_notebooks.py) to run at a reduced size; the default is the full size (at most
~10 minutes on a CPU runtime).
"""

from __future__ import annotations

import nbformat as nbf
from notebook_cells.common import ROOT
from notebook_cells.inference import CELLS_GENERATION, CELLS_SPECULATIVE
from notebook_cells.model import CELLS_CHECKPOINTS, CELLS_TOUR
from notebook_cells.scale import CELLS_SCALE
from notebook_cells.training import CELLS_POST, CELLS_PRETRAIN

NOTEBOOKS = {
    "01_model_tour.ipynb": CELLS_TOUR,
    "02_checkpoints.ipynb": CELLS_CHECKPOINTS,
    "03_pretraining.ipynb": CELLS_PRETRAIN,
    "04_generation.ipynb": CELLS_GENERATION,
    "05_speculative.ipynb": CELLS_SPECULATIVE,
    "06_post_training.ipynb": CELLS_POST,
    "07_scale.ipynb": CELLS_SCALE,
}


def write(path, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells
    ]
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating leaves unchanged cells alone
        cell.id = f"cell-{i}"
    nbf.write(nb, path)


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        write(ROOT / "notebooks" / name, cells)
