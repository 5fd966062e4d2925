"""Builds the small post-training example files in data/post/ from the arithmetic task generator.

* `sft_arith.jsonl`  — `{"messages": [user, assistant]}` dialogues: "What is 3 + 5?" answered in
  DeepSeek-R1's format `<think>3 + 5 = 8</think><answer>8</answer>`.
* `dpo_arith.jsonl`  — `{"prompt", "chosen", "rejected"}`: the correct solution against one whose
  answer is off by a non-zero amount.
* `grpo_arith.jsonl` — `{"prompt", "answer", "a", "b", "op"}` for GRPO with the accuracy and
  format rewards of deepseek_jax/rewards.py.

Everything is generated from fixed seeds (Python's `random`), so the files are reproducible;
`--check` rebuilds into a temporary folder and compares bytes.

Usage:
  python scripts/make_post_data.py [--out data/post] [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

from deepseek_jax.rewards import arithmetic_problems, arithmetic_solution

REPO = Path(__file__).resolve().parents[1]
N = 256  # records per file
OUTPUTS = ("sft_arith.jsonl", "dpo_arith.jsonl", "grpo_arith.jsonl")


def _write(path: Path, records) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sft = [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": arithmetic_solution(p)},
            ]
        }
        for p in arithmetic_problems(N, seed=1)
    ]
    _write(out / "sft_arith.jsonl", sft)

    rng = random.Random(2)
    dpo = []
    for p in arithmetic_problems(N, seed=2):
        wrong = dict(p, answer=str(int(p["answer"]) + rng.choice([-2, -1, 1, 2])))
        chosen, rejected = arithmetic_solution(p), arithmetic_solution(wrong)
        dpo.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected})
    _write(out / "dpo_arith.jsonl", dpo)
    _write(out / "grpo_arith.jsonl", arithmetic_problems(N, seed=3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "post")
    ap.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare")
    args = ap.parse_args(argv)
    if not args.check:
        build(args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        bad = [f for f in OUTPUTS if not filecmp.cmp(Path(tmp) / f, args.out / f, shallow=False)]
    if bad:
        print(f"differ from a rebuild: {bad}", file=sys.stderr)
        return 1
    print(f"{len(OUTPUTS)} files match a rebuild")
    return 0


if __name__ == "__main__":
    sys.exit(main())
