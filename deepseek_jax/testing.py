"""Numerical tolerances, pinned per dtype in one place (STYLE.md principle 7).

Tests compare against independent references with these; never loosen one to make a test pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=1e-5, rtol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
    jnp.dtype(jnp.float16): dict(atol=2e-3, rtol=2e-3),
}
# Whole-model comparisons accumulate rounding over layers; fp32 model outputs of O(1) are held to
# 1e-4 absolute (the HF-parity bar) and fp32 gradients to the same.
MODEL_FP32 = dict(atol=1e-4, rtol=1e-4)


def tolerance(dtype) -> dict[str, float]:
    """Returns `dict(atol=..., rtol=...)` for comparing arrays of `dtype`."""
    key = jnp.dtype(dtype)
    if key not in _TOLERANCES:
        raise KeyError(f"no pinned tolerance for dtype {key}; add one in deepseek_jax/testing.py")
    return dict(_TOLERANCES[key])


def assert_close(actual, expected, dtype=None, **override) -> None:
    """`np.testing.assert_allclose` with the pinned tolerance of `dtype` (default: actual's)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    tol = tolerance(dtype if dtype is not None else jnp.float32) | override
    np.testing.assert_allclose(actual, expected, **tol)


# XLA:CPU flags for the test suite's processes and the runs they start (tests/conftest.py). The
# suite's programs are small and compiling them is most of its time; XLA:CPU's legacy LLVM IR
# fusion emitters compile them in ~25% less CPU time than its default MLIR fusion emitters
# (suite: 900 -> 686 s on a 2-core CPU, every test passing; a v3-tiny train step's compile
# 6.0 -> 4.2 s, medians of three alternated runs; one small eager op ~30 -> ~16 ms). Code
# generation only: XLA's HLO passes are the same, and the tiny step's loss is bit-identical under
# both. A jaxlib that no longer knows the flag stops at start-up with "Unknown flags in
# XLA_FLAGS", naming it: then drop it here.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags_for_tests(devices: int | None = None) -> str:
    """`XLA_FLAGS` for a test's subprocess: TEST_XLA_FLAGS, and `devices` emulated CPU devices."""
    if devices is None:
        return TEST_XLA_FLAGS
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
