"""Benchmark: FP8 block-scaled matmul vs bf16 `jnp.dot` at DeepSeek-V3 shapes.

    python bench/bench_fp8_matmul.py            # V3 shapes: K=7168, N in {2048, 4096}, M 128..16384
    python bench/bench_fp8_matmul.py --small    # tiny shapes, seconds on a laptop CPU

Prints one markdown table of TFLOP/s (2*M*N*K / median wall time). FP8 columns take operands that
are already quantized (the GEMM alone); "fp8_linear fwd" adds the on-the-fly quantization of x
and w that the differentiable op performs. On a GPU the "pallas" column is the Triton-lowered
kernel; on CPU it is the same kernel interpreted (only run for --small: it measures the
interpreter, not the kernel). "triton" appears when jax-triton is importable on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from deepseek_jax.kernels import fp8_matmul as fm
from deepseek_jax.kernels import quant


def median_seconds(fn: Callable, *args, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of fn(*args) after compiling and warming up, synchronising each call."""
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _impls(small: bool) -> list[str]:
    on_gpu = jax.default_backend() == "gpu"
    impls = ["xla"]
    if on_gpu or small:  # interpreted Pallas at full size would take hours on a CPU
        impls.append("pallas")
    if on_gpu and all(importlib.util.find_spec(m) for m in ("jax_triton", "triton")):
        impls.append("triton")
    return impls


def run(shapes: list[tuple[int, int, int]], impls: list[str], repeats: int) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    for m, k, n in shapes:
        kx, kw = jax.random.split(jax.random.fold_in(key, m * 7 + n))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = jax.random.normal(kw, (k, n), jnp.bfloat16)
        xq, xs = quant.quantize_activation(x)
        wq, ws = quant.quantize_weight(w)
        flops = 2.0 * m * n * k
        row = {"M": m, "K": k, "N": n}
        dot = jax.jit(jnp.dot)  # bf16 out, like the FP8 kernels' default
        row["bf16 jnp.dot"] = flops / median_seconds(dot, x, w, repeats=repeats)
        for impl in impls:
            f = jax.jit(functools.partial(fm.fp8_matmul, impl=impl))
            row[f"fp8 {impl}"] = flops / median_seconds(f, xq, xs, wq, ws, repeats=repeats)
        lin = jax.jit(functools.partial(fm.fp8_linear, impl="auto"))
        row["fp8_linear fwd (auto)"] = flops / median_seconds(lin, x, w, repeats=repeats)
        rows.append(row)
        del x, w, xq, wq
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r[c]) if c in ("M", "K", "N") else f"{r[c] / 1e12:.3f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell")
    parser.add_argument("--m", type=int, nargs="*", default=None, help="override the M values")
    args = parser.parse_args()
    if args.small:
        ms, ks, ns = args.m or [16, 128], [512], [256]
    else:
        ms, ks, ns = args.m or [128, 512, 2048, 4096, 8192, 16384], [7168], [2048, 4096]
    repeats = args.repeats or (3 if args.small else 20)
    shapes = [(m, k, n) for n in ns for k in ks for m in ms]
    impls = _impls(args.small)
    dev = jax.devices()[0]
    print(f"# FP8 block-scaled matmul, TFLOP/s (median of {repeats}) on {dev.device_kind}")
    if jax.default_backend() == "cpu" and "pallas" in impls:
        print("# note: CPU run -- the pallas column is the interpreter, not a compiled kernel")
    print()
    print(markdown(run(shapes, impls, repeats)))


if __name__ == "__main__":
    main()
