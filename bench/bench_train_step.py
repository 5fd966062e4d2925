"""Throughput (tokens/s) and MFU of the jitted train step for the small presets, one device.

Each preset runs `--steps` timed steps after one untimed compile step on a fixed random batch
(B x T int32 tokens, one document per row), through `deepseek_jax.train.make_train_step` with the
run defaults of configs/train-v3-small.yaml (AdamW, bias update, MTP). Prints a markdown table;
FLOPs per token and the peak come from deepseek_jax/train/flops.py (on CPU the machine's peak,
`cpu_peak`, unless --peak-flops is given).

    python bench/bench_train_step.py
    python bench/bench_train_step.py --presets v3-small --batch 8 --seq 256 --set remat=none
    python bench/bench_train_step.py --presets v3-1b --batch 8 --seq 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import yaml

from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.params import count_params
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.flops import flops_per_token, mfu, peak_flops
from deepseek_jax.train.step import init_train_state, make_train_step


def _batch(vocab: int, B: int, T: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(3, vocab, (B, T + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "loss_mask": np.ones((B, T), np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    }


def bench(preset: str, B: int, T: int, steps: int, changes: dict, peak: float | None) -> dict:
    """One preset: compile time, steady step time, tokens/s and MFU on the default device."""
    cfg = load_preset(preset).replace(**changes)
    tcfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=10, schedule="cosine")
    t0 = time.perf_counter()
    graphdef, state = init_train_state(cfg, tcfg, seed=0)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    step = make_train_step(cfg, LossConfig(), tcfg, graphdef)
    batch = jax.device_put(_batch(cfg.vocab_size, B, T))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    rate = B * T / step_s
    counts = count_params(cfg)
    flops = flops_per_token(cfg, T).total
    return {
        "preset": preset,
        "params": f"{counts.total / 1e6:.1f}M / {counts.activated / 1e6:.1f}M",
        "shape": f"{B} x {T}",
        "dtype": cfg.dtype,
        "init_s": init_s,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": rate,
        "gflops_token": flops / 1e9,
        "mfu": mfu(rate, flops, 1, peak_flops(override=peak)),
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["v3-tiny", "v3-small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the compile step")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="ModelConfig changes, e.g. remat=none moe_impl=capacity",
    )
    parser.add_argument(
        "--peak-flops", type=float, default=None, help="per device (default: flops.peak_flops)"
    )
    args = parser.parse_args()
    changes = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    dev = jax.devices()[0]
    rows = [
        bench(p, args.batch, args.seq, args.steps, changes, args.peak_flops) for p in args.presets
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\ndevice: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}; changes: {changes or 'none'}\n"
    )
    print(
        "| preset | params (total / activated) | B x T | dtype | compile (s) | step (ms) "
        "| tokens/s | GFLOPs/token | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['params']} | {r['shape']} | {r['dtype']} | "
            f"{r['compile_s']:.1f} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['gflops_token']:.4f} | {100 * r['mfu']:.2f}% |"
        )


if __name__ == "__main__":
    main()
