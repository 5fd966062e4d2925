"""Keep freed host memory in the process, so XLA:CPU stops page-faulting its buffers every step.

XLA:CPU allocates one executable's temporaries as a single block per call (`posix_memalign`):
449 MB for the CPU comparison's train step (bench/bench_vs_torch.py). Its worker threads use glibc
arenas of their own, and glibc serves a block that large from a fresh `mmap` and returns it with
`munmap` when freed, so every step faults in 110k new pages (the kernel zeroes each one): 0.2 s
of system time in a ~0.5 s step on 2 cores. Serving every thread from the main arena, never by
`mmap`, and never trimming the heap keeps that block in the process, and the next step reuses it:
0 faults per step; bench/bench_vs_torch.py's train step went from 0.87x of PyTorch's to
0.97-1.08x over four runs (docs/benchmarks.md).

The price: the process keeps its peak host memory (it never returns freed pages to the system),
as tcmalloc or jemalloc would, and XLA's compiles, whose threads now share one heap, run slower:
the CPU comparison's first step took 17-19 s instead of 12-13 s. A long run gains (300 steps of
train_main.py: ~0.16 s per step); a compile-bound process (the test suite) does not, and leaves
it off. glibc reads these settings when a thread first allocates, so they must be set before JAX
starts its CPU backend (its threads); later they would not reach them.

Where you control the environment, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` is the better fix: glibc
then backs such blocks with transparent huge pages (2 MB faults instead of 4 KB ones, ~600 per
step), each thread keeps its arena, and compiles keep their speed (measured: step 378-404 ms,
first step 13.2-13.6 s; these settings: 411-417 ms, 16.4-16.7 s; neither: 456-539 ms, 12.3-13.4
s). It needs transparent huge pages in "madvise" or "always" mode
(/sys/kernel/mm/transparent_hugepage/enabled) and must be set before the process starts; "auto"
leaves malloc alone when it is set.

    from deepseek_jax import host_memory
    host_memory.reuse_freed_host_memory()   # before the first JAX computation
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def _glibc():
    """The process's C library when it is glibc (has mallopt), else None."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def runs_on_cpu(platforms: str | None = None) -> bool:
    """Whether JAX will run on its CPU backend: `platforms` (default: jax_platforms, i.e.
    JAX_PLATFORMS) names only cpu, or, when none are named, no accelerator plugin (CUDA, ROCm,
    TPU) is installed. Starts no backend."""
    import jax

    if platforms is None:
        platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    plugins = (
        "jax_cuda12_plugin",
        "jax_cuda13_plugin",
        "jax_rocm60_plugin",
        "jax_rocm7_plugin",
        "libtpu",
        "jax_plugins",
    )
    return not any(importlib.util.find_spec(name) is not None for name in plugins)


def reuse_freed_host_memory(*, required: bool = True) -> bool:
    """Sets glibc malloc to serve all threads from its main heap, never by mmap, never trimmed.

    Args:
      required: raise if it cannot take effect (not glibc, or JAX's backends already started);
        with False it then returns False and changes nothing.
    Returns:
      True when the settings are in place (also when an earlier call set them).
    Raises:
      RuntimeError: `required` and it cannot take effect; the message says why.
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    why = None
    if libc is None:
        why = "the C library is not glibc (mallopt is glibc's)"
    elif _backends_started():
        why = (
            "JAX's backends have already started, and their threads keep the malloc arenas "
            "they have: call it before the first JAX computation"
        )
    if why is not None:
        if required:
            raise RuntimeError(f"reuse_freed_host_memory: cannot take effect: {why}")
        return False
    ok = (
        libc.mallopt(_M_ARENA_MAX, 1)  # every thread allocates from the main arena (brk heap)
        and libc.mallopt(_M_MMAP_MAX, 0)  # ... and never by mmap, however large the block
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # freed blocks stay for reuse
    )
    if not ok:
        raise RuntimeError("reuse_freed_host_memory: glibc mallopt refused a setting")
    _applied = True
    return True


def configure(mode: str) -> bool:
    """`train.host_malloc`: "reuse" (must take effect), "auto" (reuse when JAX runs on CPU, no
    glibc.malloc.hugetlb tunable is set and it can still take effect) or "system" (leave malloc
    alone). Returns whether the reuse settings are in effect."""
    if mode == "system":
        return _applied
    if mode == "reuse":
        return reuse_freed_host_memory(required=True)
    if mode == "auto":
        if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
            return False  # huge-page-backed blocks already (see the module docstring)
        return runs_on_cpu() and reuse_freed_host_memory(required=False)
    raise ValueError(f"host_malloc={mode!r}: allowed 'auto', 'reuse', 'system'")
