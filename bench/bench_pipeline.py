"""Pipeline executor overhead vs the non-pipelined step on emulated CPU devices.

Both compute the same loss and gradients of the same batch (v3-tiny, MoE layers split over the
stages); on one CPU the pipelined version cannot be faster: the ratio measures what the lockstep
scan, the ppermutes and the stage-granular recomputation (B and W re-run the stage forward) cost.

    python bench/bench_pipeline.py [--layers 5] [--batch 16] [--seq 32]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from deepseek_jax.config import load_preset  # noqa: E402
from deepseek_jax.losses import LossConfig, total_loss  # noqa: E402
from deepseek_jax.model import DeepSeekModel  # noqa: E402
from deepseek_jax.pipeline_stages import pipelined_value_and_grad  # noqa: E402
from deepseek_jax.sharding.schedules import (  # noqa: E402
    dualpipe_schedule,
    one_f_one_b_schedule,
    zb1p_schedule,
)


def timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=5, help="1 dense + 4 MoE layers")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    cfg = load_preset("v3-tiny").replace(num_hidden_layers=args.layers, remat="none")
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    lcfg = LossConfig()
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
    batch = {"input_ids": ids, "labels": jnp.roll(ids, -1, 1)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def plain(p, b):
        return jax.value_and_grad(
            lambda p: total_loss(nnx.merge(graphdef, p, rest)(b["input_ids"]), b, cfg, lcfg)[0]
        )(p)

    base = timed(plain, params, batch)
    print("| schedule | PP | micro-batches | step (ms) | vs non-pipelined |")
    print("|---|---|---|---|---|")
    print(f"| none | 1 | 1 | {base * 1e3:.1f} | 1.00x |")
    for name, build, pp, mb in [
        ("1F1B", one_f_one_b_schedule, 2, 4),
        ("1F1B", one_f_one_b_schedule, 4, 8),
        ("ZB1P", zb1p_schedule, 4, 8),
        ("DualPipe", dualpipe_schedule, 2, 4),
        ("DualPipe", dualpipe_schedule, 4, 8),
    ]:
        mesh = jax.make_mesh(
            (pp,), ("stage",), devices=jax.devices()[:pp], axis_types=(jax.sharding.AxisType.Auto,)
        )
        sched = build(pp, mb)
        fn = jax.jit(
            lambda b, sched=sched, mesh=mesh: pipelined_value_and_grad(model, b, sched, mesh, lcfg)[
                :2
            ]
        )
        t = timed(fn, batch)
        print(f"| {name} | {pp} | {mb} | {t * 1e3:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
