"""Shared fixtures. Eight emulated CPU devices for the sharding tests (set before jax loads)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for the run, shared by the xdist workers (they inherit the
# environment of the controller, which imports this file first): tests that jit the same
# computation (the v3-tiny model, its train step) compile it once. A fresh directory per run, so
# nothing stale is ever read; point JAX_COMPILATION_CACHE_DIR elsewhere to keep it across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deepseek-jax-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from deepseek_jax.config import load_preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_preset("v3-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from deepseek_jax.model import DeepSeekModel

    return DeepSeekModel(tiny_cfg, rngs=nnx.Rngs(0))


@pytest.fixture
def key():
    return jax.random.key(0)
