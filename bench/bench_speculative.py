"""MTP speculative decoding: acceptance and tokens/s against plain decoding on a trained model.

Without `--run`, trains the model `python train_main.py` trains (configs/train-v3-small.yaml:
v3-small with one MTP module, on the shipped corpus) for `--steps` steps, then continues it with
the MTP-only recipe (configs/train-mtp-draft-small.yaml: frozen main model) for `--mtp-steps`
steps, and benchmarks both checkpoints. Prompts are the first `--prompt-len` tokens of held-out
documents (data/pydoc_valid.jsonl). For each batch size and k it prints acceptance per draft
position, mean accepted length (tokens per verify step) and decode tokens/s (greedy; the second
of 3 interleaved rounds after compiling is kept), next to plain decoding, and checks
that the speculative tokens equal the plain ones.

    python bench/bench_speculative.py --steps 300 --mtp-steps 100          # CPU, ~v3-small
    python bench/bench_speculative.py --run runs/v3-small --run runs/v3-small-mtp
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from deepseek_jax.data.pipeline import SHIPPED_VALID
from deepseek_jax.inference import generate
from deepseek_jax.inference.cli import load_run


def train(out: Path, steps: int, mtp_steps: int, overrides: list[str]) -> list[Path]:
    from deepseek_jax.train.config import load_run_config
    from deepseek_jax.train.loop import run

    base, mtp = out / "base", out / "mtp"
    t0 = time.perf_counter()
    run(load_run_config("configs/train-v3-small.yaml", [
        f"train.steps={steps}", f"train.run_dir={base}", "train.progress=false", *overrides,
    ]))  # fmt: skip
    t1 = time.perf_counter()
    run(load_run_config("configs/train-mtp-draft-small.yaml", [
        f"train.steps={mtp_steps}", f"train.run_dir={mtp}", f"train.init_from={base}",
        "train.warmup_steps=10", "train.progress=false", *overrides,
    ]))  # fmt: skip
    print(f"trained {steps} steps in {t1 - t0:.0f}s, then MTP-only {mtp_steps} steps in "
          f"{time.perf_counter() - t1:.0f}s")  # fmt: skip
    return [base, mtp]


def held_out_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    prompts = []
    with open(SHIPPED_VALID) as f:
        for line in f:
            ids = tokenizer.encode(json.loads(line)["text"])
            if len(ids) >= length:
                prompts.append(ids[:length])
            if len(prompts) == n:
                break
    return prompts


def bench(model, prompts, ks, new, rounds=3):
    """Compiles every variant, then runs `rounds` rounds of all of them interleaved (so that load
    from other jobs hits plain and speculative decoding alike) and keeps each one's fastest."""
    B = len(prompts)
    variants = [dict()] + [dict(draft="mtp", num_draft_tokens=k) for k in ks]
    for kw in variants:
        generate(model, prompts, max_new_tokens=new, **kw)  # compile
    best = [None] * len(variants)
    for _ in range(rounds):
        for i, kw in enumerate(variants):
            r = generate(model, prompts, max_new_tokens=new, **kw)
            if best[i] is None or r.stats["decode_s"] < best[i].stats["decode_s"]:
                best[i] = r
    plain = best[0]
    rate0 = plain.stats["decode_tokens_per_s"]
    rows = []
    for k, res in zip([None, *ks], best, strict=True):
        total = res.stats["prefill_s"] + res.stats["decode_s"]
        rate = res.stats["decode_tokens_per_s"]
        if k is None:
            rows.append((B, "plain", "-", "-", rate, 1.0, total, True))
            continue
        s = res.stats["speculative"]
        per = " / ".join(f"{a:.2f}" for a in s["acceptance_per_position"])
        rows.append((B, f"mtp k={k}", per, f"{s['mean_accepted_length']:.2f}", rate,
                     rate / rate0, total, res.tokens == plain.tokens))  # fmt: skip
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", default=[], help="run folder(s) to benchmark")
    p.add_argument("--out", default="runs/bench-speculative", help="where to train")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mtp-steps", type=int, default=100)
    p.add_argument("--set", nargs="*", default=[], help="run-config overrides key=value")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    runs = [Path(r) for r in args.run] or train(
        Path(args.out), args.steps, args.mtp_steps, args.set
    )
    print(f"\nmachine: {platform.machine()} {jax_devices()}, prompts: held-out "
          f"{args.prompt_len} tokens, {args.new} new tokens, greedy\n")  # fmt: skip
    print("| checkpoint | batch | decoding | acceptance per position | mean accepted length "
          "| decode tok/s | speed-up | prefill + decode s | tokens = plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        model, tokenizer, step = load_run(r)
        for B in args.batches:
            for row in bench(model, held_out_prompts(tokenizer, B, args.prompt_len), args.ks,
                             args.new):  # fmt: skip
                B_, name, per, mal, rate, speed, total, same = row
                print(f"| {r.name} (step {step}) | {B_} | {name} | {per} | {mal} | {rate:.1f} "
                      f"| {speed:.2f}x | {total:.2f} | {same} |", flush=True)  # fmt: skip


def jax_devices() -> str:
    import jax

    return f"{jax.devices()[0].platform} x{jax.device_count()}"


if __name__ == "__main__":
    main()
