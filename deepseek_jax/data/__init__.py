"""Training data: document sources, tokenizers, packing and the per-host grain pipeline.

Example::

    cfg = DataConfig()                      # the shipped corpus and tokenizer in data/
    it = iter(make_dataset(cfg, process_index=0, process_count=1))
    batch = next(it)                        # dict of int32 [B, T], keys packing.FEATURES
    state = it.get_state()                  # checkpoint; it.set_state(state) resumes
"""

from deepseek_jax.data.packing import FEATURES
from deepseek_jax.data.pipeline import (
    DATA_DIR,
    SHIPPED_TOKENIZER,
    SHIPPED_TRAIN,
    SHIPPED_VALID,
    DataConfig,
    make_dataset,
)
from deepseek_jax.data.sources import FORMATS, open_source
from deepseek_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "DATA_DIR",
    "FEATURES",
    "FORMATS",
    "SHIPPED_TOKENIZER",
    "SHIPPED_TRAIN",
    "SHIPPED_VALID",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "make_dataset",
    "open_source",
    "train_bpe",
]
