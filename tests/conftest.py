"""Shared fixtures; eight emulated CPU devices for the sharding tests (set before jax starts)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for the run, shared by the xdist workers (they inherit the
# environment of the controller, which imports this file first): tests that jit the same
# computation (the v3-tiny model, its train step) compile it once. A fresh directory per run, so
# nothing stale is ever read; point JAX_COMPILATION_CACHE_DIR elsewhere to keep it across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deepseek-jax-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# JAX reads the variables above when it is imported, XLA:CPU reads XLA_FLAGS when the backend
# starts: 8 emulated devices, and code generation that compiles faster
# (deepseek_jax.testing.TEST_XLA_FLAGS). A user's own XLA_FLAGS are kept as given.
from deepseek_jax.testing import xla_flags_for_tests  # noqa: E402 (imports jax, starts nothing)

os.environ.setdefault("XLA_FLAGS", xla_flags_for_tests(devices=8))

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from deepseek_jax.config import load_preset  # noqa: E402

# The suite's programs are small and compiling them is most of its time: in this process XLA's
# LLVM back end runs at optimisation level 0 (XLA's own HLO passes still run; only the machine
# code is less tuned). The notebooks' kernels and the training loop's runs, which are compared
# with each other (test_notebooks.py, train/test_loop.py), compile as this process does. The
# post-training runs (train/test_post_training.py) keep XLA's defaults: their learning thresholds
# were set under them, and any change of rounding moves those chaotic trajectories (with this
# process's flags the DPO margin grew 4.6x where 5x is asserted).
# A module whose programs run long, or that compares two programs' FP8 rounding, uses
# `optimized_codegen`. JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
    jax.config.update("jax_disable_most_optimizations", True)

# Start the backend now, so that no in-process `train.loop.run` (train.host_malloc "auto") sets
# the process's malloc to one shared heap: that makes XLA's compiles, most of the suite's time,
# ~30% slower (deepseek_jax/host_memory.py); tests/test_host_memory.py checks it in subprocesses.
jax.devices()


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_preset("v3-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from deepseek_jax.model import DeepSeekModel

    return DeepSeekModel(tiny_cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def optimized_codegen():
    """This module's programs compile fully optimised (request it before any fixture that jits).

    For checks that two different programs agree to FP32 rounding through FP8 quantization: a
    one-ulp difference flips an E4M3 rounding, and unoptimised code generation rounds some
    intermediate differently in one program than in the other (tests/inference/test_fp8_weights:
    served FP8 decode vs its recipe twin, 6e-3 apart at level 0, 1.5e-6 optimised).
    """
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(config, items):
    """Runs files with a `slow` test first, then the others by number of tests, most first.

    Under `-n 2 --dist loadfile` a file runs on one worker, and files are handed out in this
    order (pyproject.toml turns off xdist's own reorder by test count, which put the long files
    with few tests, the training runs, last, where one worker ran them while the other idled).
    """
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def order(path):
        tests = files[path]
        return (not any(t.get_closest_marker("slow") for t in tests), -len(tests))

    items[:] = [item for path in sorted(files, key=order) for item in files[path]]
