"""Train a DeepSeek-V2/V3 model: `python train_main.py [--config FILE] [section.field=value ...]`.

With no arguments it trains the small V3 of configs/train-v3-small.yaml (MLA + MoE + MTP) on CPU
on the corpus shipped in data/. Everything happens in `deepseek_jax.train`: the loop in
deepseek_jax/train/loop.py, the run config's sections and fields in deepseek_jax/train/config.py.
"""

import sys

from deepseek_jax.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
