"""deepseek_jax/host_memory.py: freed host memory stays in the process (train.host_malloc)."""

import os
import subprocess
import sys
import textwrap

import pytest

from deepseek_jax import host_memory
from deepseek_jax.train.config import TrainConfig

pytestmark = pytest.mark.skipif(
    host_memory._glibc() is None, reason="mallopt is glibc's; other C libraries keep their own"
)

# A jitted function whose result (64 MB, far above glibc's largest mmap threshold of 32 MB)
# XLA:CPU allocates afresh on every call, called again and again, each result freed before the
# next call; prints the minor page faults of the least-faulting of the last 5 calls.
_PROBE = textwrap.dedent(
    """
    import resource, sys
    import jax, jax.numpy as jnp
    from deepseek_jax import host_memory
    print("in effect", host_memory.configure(sys.argv[1]))
    f = jax.jit(lambda x: jnp.sin(x) * 2.0)
    x = jnp.ones((4096, 4096), jnp.float32)
    for _ in range(10):  # the heap grows to the few blocks that calls in flight hold
        f(x).block_until_ready()
    faults = []
    for i in range(5):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
        del y
    print("faults", min(faults))
    """
)


def _probe(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one device: the probe's call runs on the backend's threads
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    return lines["in"] == "effect True", int(lines["faults"])


def test_reuse_keeps_freed_blocks_mapped():
    """Under "system" every call faults its 64 MB block in afresh (>= 10k of its 16k 4 KiB
    pages); under "reuse" the next call reuses the freed block: (almost) no faults. (A train
    step's 449 MB of temporaries is allocated and freed the same way, per call.)"""
    on, faults_reuse = _probe("reuse")
    assert on
    off, faults_system = _probe("system")
    assert not off
    assert faults_reuse < 500, faults_reuse
    if _thp_mode() != "always":  # with THP "always" the kernel maps such a block in 2 MB pages
        assert faults_system >= 10_000, faults_system


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def test_auto_leaves_a_hugetlb_tunable_alone(monkeypatch):
    """GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge-page-backed blocks, set before the process
    started) is the better fix where one controls the environment: "auto" then changes nothing."""
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "reuse_freed_host_memory", lambda **_: pytest.fail("applied"))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert host_memory.configure("auto") is False


def test_reuse_after_backend_start_is_an_error(monkeypatch):
    """Once JAX's backend threads hold their arenas the setting cannot reach them: "reuse" says
    so, "auto" leaves malloc alone."""
    import jax.numpy as jnp

    jnp.zeros(()).block_until_ready()  # the backend has started
    monkeypatch.setattr(host_memory, "_applied", False)
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
        host_memory.configure("reuse")
    assert host_memory.configure("auto") is False
    assert host_memory.configure("system") is False


def test_runs_on_cpu_reads_jax_platforms():
    assert host_memory.runs_on_cpu("cpu")
    assert not host_memory.runs_on_cpu("cuda,cpu")
    assert not host_memory.runs_on_cpu("tpu")
    assert host_memory.runs_on_cpu()  # conftest sets JAX_PLATFORMS=cpu


def test_config_field_is_checked():
    assert TrainConfig().host_malloc == "auto"
    with pytest.raises(ValueError, match="host_malloc"):
        TrainConfig(host_malloc="jemalloc")
    with pytest.raises(ValueError, match="host_malloc"):
        host_memory.configure("jemalloc")
