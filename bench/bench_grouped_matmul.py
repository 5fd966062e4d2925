"""Benchmark: grouped expert GEMM vs `jax.lax.ragged_dot` and vs a dense matmul of equal FLOPs.

    python bench/bench_grouped_matmul.py           # V3 routed experts: E=256, top-8, K=7168, N=2048
    python bench/bench_grouped_matmul.py --small   # tiny shapes, seconds on a laptop CPU

M tokens are routed to top-k of E experts by random affinities (roughly balanced, like a trained
V3 router with its bias balancing), giving M*k rows sorted by expert. Every column does the same
2 * M*k * K * N useful FLOPs; "dense" is one [M*k, K] @ [K, N] matmul, the ceiling a grouped
kernel can hope for. FP8 columns take pre-quantized operands. Prints one markdown table of TFLOP/s
(median wall time). On CPU the Pallas columns are the interpreter and run only with --small.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from deepseek_jax.kernels import grouped_matmul as gm
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


def route(key: jax.Array, tokens: int, experts: int, top_k: int) -> jax.Array:
    """[E] int32 rows per expert when each token picks top_k experts by random affinity."""
    scores = jax.random.uniform(key, (tokens, experts))
    _, chosen = jax.lax.top_k(scores, top_k)  # [M, k]
    return jnp.bincount(chosen.reshape(-1), length=experts).astype(jnp.int32)


def _gmm_fp8(xq, xs, wq, ws, gs, *, impl):
    return gm.gmm(xq, wq, gs, x_scale=xs, w_scale=ws, impl=impl)


def run(tokens_list, e, top_k, k, n, with_pallas: bool, repeats: int) -> list[dict]:
    key = jax.random.key(0)
    kw, kx, kr = jax.random.split(key, 3)
    w = jax.random.normal(kw, (e, k, n), jnp.bfloat16)
    wq, ws = quant.quantize_weight(w)  # per-expert 128x128 blocks
    rows = []
    for tokens in tokens_list:
        m = tokens * top_k
        gs = route(jax.random.fold_in(kr, tokens), tokens, e, top_k)
        x = jax.random.normal(jax.random.fold_in(kx, tokens), (m, k), jnp.bfloat16)
        xq, xs = quant.quantize_activation(x)
        flops = 2.0 * m * k * n
        row = {"tokens": tokens, "rows (M*k)": m, "E": e, "K": k, "N": n}
        ragged = jax.jit(jax.lax.ragged_dot)
        row["ragged_dot bf16"] = flops / median_seconds(ragged, x, w, gs, repeats=repeats)
        impls = ["xla", "pallas"] if with_pallas else ["xla"]
        if with_pallas:
            f = jax.jit(functools.partial(gm.gmm, impl="pallas"))
            row["gmm pallas bf16"] = flops / median_seconds(f, x, w, gs, repeats=repeats)
        for impl in impls:
            f = jax.jit(functools.partial(_gmm_fp8, impl=impl))
            row[f"gmm fp8 {impl}"] = flops / median_seconds(f, xq, xs, wq, ws, gs, repeats=repeats)
        dense = jax.jit(jnp.dot)
        row["dense bf16 (equal FLOPs)"] = flops / median_seconds(dense, x, w[0], repeats=repeats)
        rows.append(row)
        del x, xq
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    ints = ("tokens", "rows (M*k)", "E", "K", "N")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r[c]) if c in ints else f"{r[c] / 1e12:.3f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="override M values")
    args = parser.parse_args()
    if args.small:
        tokens, e, top_k, k, n = args.tokens or [32, 128], 16, 4, 256, 128
    else:
        tokens, e, top_k, k, n = args.tokens or [128, 512, 2048, 8192, 16384], 256, 8, 7168, 2048
    on_gpu = jax.default_backend() == "gpu"
    repeats = args.repeats or (3 if args.small else 20)
    dev = jax.devices()[0]
    print(
        f"# Grouped GEMM (E={e}, top-{top_k}), TFLOP/s (median of {repeats}) on {dev.device_kind}"
    )
    if not on_gpu and args.small:
        print("# note: CPU run -- the pallas columns are the interpreter, not a compiled kernel")
    print()
    rows = run(tokens, e, top_k, k, n, with_pallas=on_gpu or args.small, repeats=repeats)
    print(markdown(rows))


if __name__ == "__main__":
    main()
