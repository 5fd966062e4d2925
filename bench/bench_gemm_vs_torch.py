"""Plain fp32 GEMMs at the CPU comparison's shapes, XLA:CPU (jitted `x @ w`) vs PyTorch, side by
side in one process: the floor under bench/bench_vs_torch.py's ratio (a train step is mostly these
products, so a backend whose GEMM is slower cannot train faster however the model is written).

Shapes (v3-small, B x T = 8 x 256 = 2048 tokens): the dense projections [2048, 256] x [256, 768],
an expert's rows [512, 256] x [256, 256], one block-sparse tile [64, 256] x [256, 256] and the
LM head [2048, 256] x [256, 2048]. Each row: the median of 7 timed batches of repeated products.

    python bench/bench_gemm_vs_torch.py
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(2048, 256, 768), (512, 256, 256), (64, 256, 256), (2048, 256, 2048)]


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def main() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    matmul = jax.jit(lambda x, w: x @ w)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("\n| M x K x N | XLA:CPU GFLOP/s | torch GFLOP/s | XLA / torch |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = rng.random((m, k), np.float32)
        w = rng.random((k, n), np.float32)
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        jax.block_until_ready(matmul(jx, jw))
        reps = max(1, int(2e8 / (m * k * n)))
        flops = 2 * m * k * n
        ours = flops / _median_seconds(lambda jx=jx, jw=jw: matmul(jx, jw), reps) / 1e9
        theirs = flops / _median_seconds(lambda tx=tx, tw=tw: tx @ tw, reps) / 1e9
        print(f"| {m} x {k} x {n} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
