"""The wheel ships the presets, tokenizer and corpus as package data, and the CLI dispatches."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from deepseek_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "deepseek_jax", "configs", "data")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        copy = shutil.copytree if os.path.isdir(path) else shutil.copy
        kw = {"ignore": shutil.ignore_patterns("__pycache__")} if os.path.isdir(path) else {}
        copy(path, src / name, **kw)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(out), str(src)],
        check=True,
    )
    (wheel,) = out.glob("deepseek_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist()), z.read(
            next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        ).decode()


def test_wheel_ships_presets_tokenizer_and_corpus(wheel_names):
    names, _ = wheel_names
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    assert presets and all(f"deepseek_jax/presets/{p}" in names for p in presets)
    for asset in ("tokenizer.json", "pydoc_train.jsonl", "pydoc_valid.jsonl", "LICENSE-PSF.txt"):
        assert f"deepseek_jax/assets/{asset}" in names
    # the post-training data the shipped SFT / DPO / GRPO configs name
    post = sorted(os.listdir(os.path.join(ROOT, "data", "post")))
    assert post and all(f"deepseek_jax/assets/post/{f}" in names for f in post)
    # The kernels and sharding subpackages, and no top-level `kernels` / `sharding` (PyPI names).
    assert "deepseek_jax/kernels/__init__.py" in names
    assert "deepseek_jax/sharding/__init__.py" in names
    assert not any(n.startswith(("kernels/", "sharding/", "configs/", "data/")) for n in names)
    # every module of the checkout's package (a subpackage missing from pyproject's list is not)
    pkg = os.path.join(ROOT, "deepseek_jax")
    modules = {
        os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
        for d, _, files in os.walk(pkg)
        for f in files
        if f.endswith(".py")
    }
    assert modules and not modules - names, sorted(modules - names)


def test_wheel_declares_the_command(wheel_names):
    _, entry_points = wheel_names
    assert "deepseek-jax = deepseek_jax.cli:main" in entry_points


def test_cli_dispatch_and_errors(capsys, monkeypatch):
    assert cli.main([]) == 2 and "train,convert,plan,generate" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr("deepseek_jax.train.loop.main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "train.steps=1"]) == 0 and seen == [["train.steps=1"]]
    # A module that does not exist (generate, until its issue lands) fails with a message.
    monkeypatch.setitem(cli.COMMANDS, "generate", ("deepseek_jax.no_such_tool", "x"))
    with pytest.raises(SystemExit, match="has no deepseek_jax.no_such_tool module"):
        cli.main(["generate"])


def test_shipped_data_paths_resolve_outside_a_checkout(tmp_path, monkeypatch):
    from deepseek_jax.resources import asset_dir, data_path

    monkeypatch.chdir(tmp_path)  # no data/ folder here
    got = data_path("data/post/sft_arith.jsonl")
    assert os.path.isfile(got) and got.startswith(str(asset_dir()))
    assert data_path("data/post/nope.jsonl") == "data/post/nope.jsonl"  # the reader names it
    (tmp_path / "data" / "post").mkdir(parents=True)
    (tmp_path / "data" / "post" / "sft_arith.jsonl").write_text("{}\n")
    assert data_path("data/post/sft_arith.jsonl") == "data/post/sft_arith.jsonl"  # user's first


def test_checkpoint_modules_import_in_any_order():
    # restore <- hf.load, restore <- orbax_layout -> hf, pretrained -> both: importing the shared
    # module first (a fresh interpreter) must not meet a half-initialised deepseek_jax.hf.
    code = (
        "import deepseek_jax.restore, deepseek_jax.orbax_layout, deepseek_jax.hf as hf\n"
        "import deepseek_jax.pretrained as p\n"
        "assert hf.load_pretrained is p.load_pretrained\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
