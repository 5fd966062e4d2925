"""Dropless routed experts: block-sparse tiles ("blocked") vs `ragged_dot` ("grouped"), FP8 or not.

    python bench/bench_blocked_moe.py                    # v3-small's MoE layer, B x T = 8 x 256
    python bench/bench_blocked_moe.py --tokens 256 --rounds 3

One MoE layer's routed experts (`deepseek_jax.moe.routed_dropless`, the `gmm` argument picks the
plan) under `jax.jit`, on random tokens routed top-K by random affinities: in training, forward and
backward (the gradients of x, the gates and the three expert weights) in the compute dtype and in
the V3 FP8 recipe; in serving, the forward with the experts stored in FP8 (`fp8_weights`).
Each configuration compiles once; then `--rounds` rounds time every configuration in turn
(interleaved, so a machine whose speed drifts treats them alike) and the table gives the median.
The speed-up column compares each "blocked" row with the "grouped" row of the same precision
and pass, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import fp8_weights
from deepseek_jax.config import load_preset
from deepseek_jax.moe import routed_dropless
from deepseek_jax.moe.router import Routing


def _case(tokens: int, d: int, f: int, e: int, k: int, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, d)), dtype)
    scores = rng.standard_normal((tokens, e))
    experts = jnp.asarray(np.argsort(-scores, axis=1)[:, :k], jnp.int32)
    gates = jax.nn.softmax(jnp.asarray(np.sort(scores, axis=1)[:, ::-1][:, :k], jnp.float32), -1)
    scale = d**-0.5
    ws = tuple(  # FP32 master weights, as in training
        jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
        for s in ((e, d, f), (e, d, f), (e, f, d))
    )
    return x, gates, experts, ws


def _step(gmm: str, fp8: bool, experts):
    def loss(x, gates, *ws):
        y = routed_dropless(x, Routing(gates, experts, None), *ws, fp8=fp8, gmm=gmm)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def _serve(gmm: str, experts):
    def forward(x, gates, *stored):
        return routed_dropless(x, Routing(gates, experts, None), *stored, gmm=gmm)

    return jax.jit(forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="v3-small")
    parser.add_argument("--tokens", type=int, default=8 * 256, help="B x T")
    parser.add_argument("--dtype", default="bfloat16", help="the compute dtype of the tokens")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = load_preset(args.preset)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    x, gates, experts, ws = _case(args.tokens, d, f, e, k, jnp.dtype(args.dtype))
    stored = [fp8_weights.quantize(w, stack_dims=1) for w in ws]
    cases = {}  # (precision, pass, plan) -> (function, its expert weights)
    for gmm in ("grouped", "blocked"):
        cases[(args.dtype, "train", gmm)] = (_step(gmm, False, experts), ws)
    for gmm in ("grouped", "blocked"):
        cases[("FP8 (V3 recipe)", "train", gmm)] = (_step(gmm, True, experts), ws)
    for gmm in ("grouped", "blocked"):
        cases[("FP8 stored (serving)", "forward", gmm)] = (_serve(gmm, experts), stored)
    rows = {}
    for key, (fn, weights) in cases.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, gates, *weights))
        rows[key] = (time.perf_counter() - t0, [])
    for _ in range(args.rounds):
        for key, (fn, weights) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, gates, *weights))
            rows[key][1].append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\ndevice: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}; {args.preset}: {args.tokens} tokens, "
        f"E={e} top-{k}, D={d}, F={f}, tokens in {args.dtype}, FP32 master weights\n"
    )
    print("| precision | pass | plan | first call (s) | time (ms) | blocked speed-up |")
    print("|---|---|---|---|---|---|")
    for (name, kind, gmm), (first, times) in rows.items():
        ms = 1e3 * statistics.median(times)
        base = 1e3 * statistics.median(rows[(name, kind, "grouped")][1])
        speedup = f"{base / ms:.2f}x" if gmm == "blocked" else ""
        what = "forward + backward" if kind == "train" else "forward"
        print(f"| {name} | {what} | {gmm} | {first:.1f} | {ms:.1f} | {speedup} |")


if __name__ == "__main__":
    main()
