"""Files that ship inside the package: the YAML presets, the tokenizer and the corpus.

The repository keeps them in its top-level `configs/` and `data/` folders; pyproject.toml installs
those folders as the packages `deepseek_jax.presets` and `deepseek_jax.assets` (setuptools
`package-dir` + `package-data`), so a wheel, `pip install git+...` and an editable install all
find them through `importlib.resources`, wherever the package lives.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PRESETS_PACKAGE = "deepseek_jax.presets"  # configs/
ASSETS_PACKAGE = "deepseek_jax.assets"  # data/


def _package_dir(package: str) -> Path:
    root = resources.files(package)
    if not isinstance(root, Path) or not root.is_dir():
        # grain and tokenizers read files by path, so a zipped install cannot serve them.
        raise FileNotFoundError(
            f"package data {package} is not a folder on disk ({root!r}); install deepseek-jax "
            "unzipped (pip does)"
        )
    return root


def preset_dir() -> Path:
    """The folder of the YAML presets (configs/ in the repository)."""
    return _package_dir(PRESETS_PACKAGE)


def asset_dir() -> Path:
    """The folder of the shipped tokenizer and corpus (data/ in the repository)."""
    return _package_dir(ASSETS_PACKAGE)


def data_path(path: str) -> str:
    """`path` as given when it exists; else a repository-relative `data/...` path (the shipped
    run configs name e.g. `data/post/sft_arith.jsonl`) read from the installed package data, so
    those configs also run from a wheel outside a checkout. Anything else is returned unchanged
    (its reader then names the missing file)."""
    p = Path(path)
    if p.exists() or p.is_absolute() or p.parts[:1] != ("data",):
        return path
    shipped = asset_dir().joinpath(*p.parts[1:])
    return str(shipped) if shipped.exists() else path
