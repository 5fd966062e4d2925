"""What every notebook shares: the install cell and the repository URL it installs from."""

from __future__ import annotations

import pathlib
import subprocess
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def repository_url() -> str:
    """The repository's https URL: pyproject's [project.urls] Repository, else git's origin."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    url = meta.get("urls", {}).get("Repository", "")
    if not url:
        try:
            url = subprocess.run(
                ["git", "-C", str(ROOT), "remote", "get-url", "origin"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            url = ""
    if url.startswith("git@github.com:"):
        url = "https://github.com/" + url.removeprefix("git@github.com:")
    return url.removesuffix(".git")


INSTALL = """# Install (Colab or any fresh runtime); skipped where deepseek_jax already imports.
import importlib.util, os

REPO = os.environ.get("DEEPSEEK_JAX_REPO", "{url}")
if importlib.util.find_spec("deepseek_jax") is None:
    if not REPO:
        raise RuntimeError(
            "set DEEPSEEK_JAX_REPO to this repository's git URL (https://github.com/OWNER/NAME)"
        )
    %pip install -q "deepseek-jax[plot] @ git+{{REPO}}"
elif importlib.util.find_spec("matplotlib") is None:
    %pip install -q matplotlib
SMALL = os.environ.get("DEEPSEEK_JAX_NB_SMALL") == "1"  # the test suite's reduced size
print("reduced size (CI)" if SMALL else "full size")"""


def install_cell() -> tuple[str, str]:
    return ("code", INSTALL.format(url=repository_url()))
