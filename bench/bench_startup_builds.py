"""How often a training run builds the model and the optimizer before its first step.

Counts `DeepSeekModel.__init__` calls (abstract ones under `nnx.eval_shape` included: each
traces the whole module tree) and `make_optimizer` calls during a short in-process run of
`deepseek_jax.train.loop.run`, then prints the counts and the run's wall time.

    python bench/bench_startup_builds.py                       # tiny V3, 2 steps
    python bench/bench_startup_builds.py model.preset=v3-small  # any run overrides
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time

from deepseek_jax import model as model_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import load_run_config
from deepseek_jax.train.loop import run

DEFAULTS = [
    "model.preset=v3-tiny",
    "model.num_hidden_layers=2",
    "model.vocab_size=264",
    "data.tokenizer=null",
    "data.seq_len=32",
    "data.global_batch_size=8",
    "train.steps=2",
    "train.progress=false",
]


def main(argv: list[str]) -> None:
    counts: collections.Counter[str] = collections.Counter()
    init, make = model_lib.DeepSeekModel.__init__, step_lib.make_optimizer

    def counting_init(self, *a, **k):
        counts["model builds"] += 1
        init(self, *a, **k)

    def counting_make(*a, **k):
        counts["optimizer builds"] += 1
        return make(*a, **k)

    model_lib.DeepSeekModel.__init__ = counting_init
    step_lib.make_optimizer = counting_make
    run_dir = tempfile.mkdtemp(prefix="startup-")
    start = time.perf_counter()
    run(load_run_config(None, [*DEFAULTS, f"train.run_dir={run_dir}", *argv]))
    print(f"run: {time.perf_counter() - start:.1f} s")
    for name in ("model builds", "optimizer builds"):
        print(f"{name}: {counts[name]}")


if __name__ == "__main__":
    main(sys.argv[1:])
