"""Shared fixtures. Eight emulated CPU devices for the sharding tests (set before jax loads)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
