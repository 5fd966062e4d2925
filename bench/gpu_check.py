"""One-shot GPU check: kernel correctness, kernel speed at V3 shapes, v3-1b train step MFU, decode.

Run on one H100/H200 through `bench/gpu_check.sh` (about 5-8 minutes); prints ONE markdown table
(check | measured | goal | verdict) and writes it to `--out` as well. Sections:
  correctness - Pallas FP8 block-scaled matmul and grouped GEMM (bf16 and FP8) against their pure
                jnp references, forward and VJP; the jax-triton FP8 matmul when jax-triton is
                importable, else a "skipped" row naming the missing package;
  kernels     - FP8 matmul vs bf16 `jnp.dot` at V3 shapes (K 7168, N 2048/4096); grouped GEMM
                (E 256, top-8, K 7168, N 2048) vs `ragged_dot` and vs a dense matmul of equal FLOPs;
  train       - v3-1b train step (B x T = 8 x 2048 by default), BF16 and FP8, tokens/s and MFU
                against the device's BF16 peak (deepseek_jax/train/flops.py);
  decode      - v3-1b latent-cache decode: prefill 128 tokens, then greedy single-token steps,
                tokens/s over the batch.
Goals (from the performance issue): FP8 >= 1.3x bf16 dot; grouped GEMM >= 0.85x dense and >= 1x
ragged_dot; v3-1b train MFU >= 35%.

`--smoke` runs every section at toy sizes (v3-tiny, Pallas in interpret mode on CPU) so the script
itself is tested on CPU (tests/test_gpu_check.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deepseek_jax.config import load_preset  # noqa: E402
from deepseek_jax.kernels import fp8_matmul as fm  # noqa: E402
from deepseek_jax.kernels import grouped_matmul as gm  # noqa: E402
from deepseek_jax.kernels import quant  # noqa: E402

Row = tuple[str, str, str, str]  # check, measured, goal, verdict


def _median_s(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# bf16 outputs of the same quantized math: a few bf16 ulps of the largest value.
_KERNEL_REL = 2e-2


def _vjp_errs(got, ref, dy) -> list[float]:
    """Relative errors of (output, *cotangents) of two `jax.vjp` results."""
    pairs = zip((got[0], *got[1](dy)), (ref[0], *ref[1](dy)), strict=True)
    return [_rel_err(a, b) for a, b in pairs]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def triton_missing() -> list[str]:
    return [m for m in ("jax_triton", "triton") if importlib.util.find_spec(m) is None]


def correctness(smoke: bool) -> list[Row]:
    rows: list[Row] = []
    interp = "" if jax.default_backend() == "gpu" else " (interpreted)"
    m, k, n = (32, 128, 128) if smoke else (512, 7168, 2048)
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.bfloat16) * k**-0.5
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    xq, xs = quant.quantize_activation(x)
    wq, ws = quant.quantize_weight(w)
    impls = ["pallas"]
    missing = triton_missing()
    if missing or jax.default_backend() != "gpu":
        why = f"missing {missing}" if missing else f"backend {jax.default_backend()}"
        rows.append(("fp8 matmul triton vs reference", f"skipped: {why}", "-", "SKIP"))
    else:
        impls.append("triton")
    want = fm.reference(xq, xs, wq, ws)
    for impl in impls:
        got = jax.jit(functools.partial(fm.fp8_matmul, impl=impl))(xq, xs, wq, ws)
        err = _rel_err(got, want)
        rows.append(
            (
                f"fp8 matmul {impl}{interp} fwd",
                f"rel err {err:.1e}",
                "<= 2e-2",
                _verdict(err <= _KERNEL_REL),
            )
        )
    got = jax.vjp(functools.partial(fm.fp8_linear, impl="pallas"), x, w)
    ref = jax.vjp(fm.fp8_linear_reference, x, w)
    errs = _vjp_errs(got, ref, dy)
    rows.append(
        (
            f"fp8 linear pallas{interp} fwd / dx / dw",
            " / ".join(f"{e:.1e}" for e in errs),
            "<= 2e-2",
            _verdict(max(errs) <= _KERNEL_REL),
        )
    )
    # Grouped GEMM: skewed groups with an empty one, rows past the total.
    E = 4 if smoke else 32
    sizes = np.random.default_rng(0).multinomial(m - 4, np.r_[0, np.ones(E - 1) / (E - 1)])
    gs = jnp.asarray(sizes, jnp.int32)
    wg = jax.random.normal(kw, (E, k, n), jnp.bfloat16) * k**-0.5
    for name, op, ref_op in (
        ("bf16", gm.grouped_matmul, gm.reference),
        ("fp8", gm.grouped_matmul_fp8, gm.grouped_matmul_fp8_reference),
    ):
        got = jax.vjp(lambda a, b, op=op: op(a, b, gs, impl="pallas"), x, wg)
        ref = jax.vjp(lambda a, b, op=ref_op: op(a, b, gs), x, wg)
        errs = _vjp_errs(got, ref, dy)
        rows.append(
            (
                f"grouped gemm {name} pallas{interp} fwd / dx / dw",
                " / ".join(f"{e:.1e}" for e in errs),
                "<= 2e-2",
                _verdict(max(errs) <= _KERNEL_REL),
            )
        )
    return rows


def kernels(smoke: bool) -> list[Row]:
    rows: list[Row] = []
    reps = 2 if smoke else 20
    impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    shapes = [(64, 256, 128)] if smoke else [(4096, 7168, 2048), (16384, 7168, 4096)]
    for m, k, n in shapes:
        kx, kw = jax.random.split(jax.random.key(m + n))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = jax.random.normal(kw, (k, n), jnp.bfloat16)
        xq, xs = quant.quantize_activation(x)
        wq, ws = quant.quantize_weight(w)
        t_bf16 = _median_s(jax.jit(jnp.dot), x, w, repeats=reps)
        f = jax.jit(functools.partial(fm.fp8_matmul, impl=impl))
        t_fp8 = _median_s(f, xq, xs, wq, ws, repeats=reps)
        tf = 2.0 * m * n * k / t_fp8 / 1e12
        rows.append(
            (
                f"fp8 {impl} vs bf16 dot, M{m} K{k} N{n}",
                f"{t_bf16 / t_fp8:.2f}x ({tf:.0f} TFLOP/s)",
                ">= 1.3x",
                _verdict(t_bf16 / t_fp8 >= 1.3),
            )
        )
    tokens, E, top_k, k, n = (32, 16, 4, 256, 128) if smoke else (8192, 256, 8, 7168, 2048)
    kx, kw, kr = jax.random.split(jax.random.key(1), 3)
    _, chosen = jax.lax.top_k(jax.random.uniform(kr, (tokens, E)), top_k)
    gs = jnp.bincount(chosen.reshape(-1), length=E).astype(jnp.int32)
    m = tokens * top_k
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (E, k, n), jnp.bfloat16)
    t_gmm = _median_s(jax.jit(functools.partial(gm.gmm, impl=impl)), x, w, gs, repeats=reps)
    t_rag = _median_s(jax.jit(jax.lax.ragged_dot), x, w, gs, repeats=reps)
    t_dense = _median_s(jax.jit(jnp.dot), x, w[0], repeats=reps)
    label = f"grouped gemm {impl} (E{E} top-{top_k}, {m} rows, K{k} N{n})"
    rows.append(
        (
            f"{label} vs dense equal FLOPs",
            f"{t_dense / t_gmm:.2f}x",
            ">= 0.85x",
            _verdict(t_dense / t_gmm >= 0.85),
        )
    )
    rows.append(
        (
            f"{label} vs ragged_dot",
            f"{t_rag / t_gmm:.2f}x",
            ">= 1.0x",
            _verdict(t_rag / t_gmm >= 1.0),
        )
    )
    return rows


def train(smoke: bool, batch: int, seq: int) -> list[Row]:
    from bench_train_step import bench

    rows: list[Row] = []
    preset, B, T, steps = ("v3-tiny", 1, 16, 1) if smoke else ("v3-1b", batch, seq, 5)
    for label, changes in (("bf16", {}), ("fp8", {"fp8": True})):
        base = {"remat": "none"} if smoke else {}
        r = bench(preset, B, T, steps, base | changes, None)
        rows.append(
            (
                f"{preset} train step {label}, {B} x {T}",
                f"{r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}% "
                f"(compile {r['compile_s']:.0f} s)",
                ">= 35% MFU",
                _verdict(r["mfu"] >= 0.35),
            )
        )
    return rows


def decode(smoke: bool, batch: int) -> list[Row]:
    from flax import nnx

    from deepseek_jax.model import DeepSeekModel

    preset, B, P, S = ("v3-tiny", 2, 8, 4) if smoke else ("v3-1b", batch, 128, 64)
    cfg = load_preset(preset)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, caches, index):
        # Every row starts at the same position here: positions [B, T] = index + 0..T-1.
        positions = jnp.broadcast_to(index + jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        logits, caches = nnx.merge(graphdef, state).decode(ids, caches, positions)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], caches

    caches = model.init_cache(B, P + S)
    prompt = jax.random.randint(jax.random.key(0), (B, P), 3, cfg.vocab_size, jnp.int32)
    tok, caches = jax.block_until_ready(step(state, prompt, caches, jnp.int32(0)))
    tok, c2 = jax.block_until_ready(step(state, tok, caches, jnp.int32(P)))  # compile T = 1
    t0 = time.perf_counter()
    for i in range(S):
        tok, caches = step(state, tok, caches, jnp.int32(P + i))
    jax.block_until_ready(tok)
    rate = B * S / (time.perf_counter() - t0)
    return [
        (f"{preset} decode, batch {B}, prompt {P}, {S} steps", f"{rate:.0f} tok/s", "-", "INFO")
    ]


SECTIONS = ("correctness", "kernels", "train", "decode")


def run(sections, smoke: bool, batch: int, seq: int) -> list[Row]:
    rows: list[Row] = []
    for name in sections:
        try:
            if name == "correctness":
                rows += correctness(smoke)
            elif name == "kernels":
                rows += kernels(smoke)
            elif name == "train":
                rows += train(smoke, batch, seq)
            else:
                rows += decode(smoke, batch)
        except Exception as e:  # one broken section must not hide the others' results
            traceback.print_exc()
            rows.append((f"{name} section", f"error: {type(e).__name__}: {e}"[:200], "-", "FAIL"))
    return rows


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| check | measured | goal | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CPU test of the script)")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not args.smoke and jax.default_backend() != "gpu":
        parser.error(f"needs a GPU (JAX backend is {jax.default_backend()}); use --smoke on CPU")
    dev = jax.devices()[0]
    header = (
        f"GPU check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {dev.device_kind}, "
        f"jax {jax.__version__}, jax-triton {'absent' if triton_missing() else 'present'}"
        f"{' (SMOKE: toy sizes)' if args.smoke else ''}"
    )
    table = markdown(run(args.sections, args.smoke, args.batch, args.seq), header)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
