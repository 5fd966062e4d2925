"""The training data pipeline: `DataConfig` and `make_dataset`, built from grain datasets.

Stages, per host (B = global_batch_size / process_count, T = seq_len):

  documents   MapDataset.source(open_source(...))            random access by document index
  shard       [process_index::process_count]                  disjoint, covering document sets
  shuffle     .shuffle(seed)  (if cfg.shuffle)               reshuffled each epoch by grain
  repeat      .repeat(num_epochs)                             None = forever
  tokenize    .map(tokenize)  -> [bos, ..., eos]             cfg.read_threads threads
  chunk       FlatMapIterDataset(ChunkDocument(T))           next-token pairs, <= T each
  mix         WindowShuffleIterDataset (if cfg.shuffle)      mixes chunks of different documents
  pack        FirstFitPackIterDataset -> packed examples     packing.FEATURES, int32 [T]
  batch       .batch(B) + pad_batch                           int32 [B, T]; last batch padded
  prefetch    ThreadPrefetchIterDataset (if cfg.prefetch_batches)

Every stage is a grain iterator with `get_state()` / `set_state()`, so the iterator returned by
`iter(make_dataset(...))` can be checkpointed; restoring a state into a fresh iterator replays the
same batches as an uninterrupted run. The state is a small JSON-serialisable dict (positions and
counters, never data).

Hosts shard by document, so with a finite `num_epochs` they may produce different numbers of
batches; multi-host training should repeat forever (the default) and stop on a step count.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import grain
import numpy as np

from deepseek_jax.data.packing import ChunkDocument, pack, pad_batch, without_document_masks
from deepseek_jax.data.ramp import RampBatch, batch_plan
from deepseek_jax.data.sources import FORMATS, check_not_empty, open_source
from deepseek_jax.data.tokenizer import Tokenizer, load_tokenizer
from deepseek_jax.resources import asset_dir

# data/ in the repository, installed as the package deepseek_jax.assets.
DATA_DIR = asset_dir()
SHIPPED_TRAIN = DATA_DIR / "pydoc_train.jsonl"
SHIPPED_VALID = DATA_DIR / "pydoc_valid.jsonl"
SHIPPED_TOKENIZER = DATA_DIR / "tokenizer.json"


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"DataConfig.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
      paths: files, folders or glob patterns (a single string is accepted).
      format: "text" (a document per file), "jsonl" or "arrayrecord" (see `sources`).
      text_field: key of the document text in "jsonl" / "arrayrecord" records.
      tokenizer: a Hugging Face tokenizer.json, or None for UTF-8 bytes (`ByteTokenizer`).
      seq_len: T, tokens per packed row.
      global_batch_size: rows per step over all hosts; each host gets an equal share.
      shuffle: shuffle documents (per epoch), chunks (in a window) and packed rows.
      seed: seed of every shuffle (`make_dataset` may override it).
      num_epochs: passes over the documents; None repeats forever.
      shuffle_window: chunks held by the window shuffle.
      packing_bins: rows filled at once by first-fit packing.
      read_threads: threads tokenizing documents (0 = in the consuming thread).
      prefetch_batches: batches prepared ahead in a background thread (0 = none; the shipped
        corpus needs none, ~5 ms per batch). With a thread, call the iterator's `close()` when
        done so it does not outlive the interpreter's modules.
      document_masking: True (default): a packed chunk attends only within itself and its
        positions restart at 0. False: DeepSeek-V3's packing (V3 report Sec. 4.1, "we do not
        incorporate cross-sample attention masking"): one segment per row, positions run on
        across documents; only padding is masked (`packing.without_document_masks`).
      batch_ramp_start, batch_ramp_tokens, batch_ramp_increment: V3's batch-size ramp (Sec. 4.2:
        3072 -> 15360 sequences over the first 469B tokens): the global batch grows from
        batch_ramp_start to global_batch_size in steps of batch_ramp_increment (default: the
        start size) as the tokens seen reach the ramp (train/schedule.py). null = no ramp.
      max_bad_records: unreadable records (invalid JSON or UTF-8, no text field) skipped with a
        warning that counts them; one more raises. 0 = the first bad record raises.
    """

    paths: tuple[str, ...] = (str(SHIPPED_TRAIN),)
    format: str = "jsonl"
    text_field: str = "text"
    tokenizer: str | None = str(SHIPPED_TOKENIZER)
    seq_len: int = 256
    global_batch_size: int = 8
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    shuffle_window: int = 512
    packing_bins: int = 32
    read_threads: int = 1
    prefetch_batches: int = 0
    document_masking: bool = True
    batch_ramp_start: int | None = None
    batch_ramp_tokens: float | None = None
    batch_ramp_increment: int | None = None
    max_bad_records: int = 0

    def __post_init__(self):
        paths = self.paths
        # YAML gives lists and users give Paths or one string; store one canonical tuple.
        if isinstance(paths, str | Path):
            paths = (paths,)
        if not isinstance(paths, list | tuple) or not paths:
            _fail("paths", self.paths, "give one or more files, folders or glob patterns")
        if not all(isinstance(p, str | Path) and str(p) for p in paths):
            _fail("paths", self.paths, "every entry must be a non-empty path string")
        object.__setattr__(self, "paths", tuple(str(p) for p in paths))
        if isinstance(self.tokenizer, Path):
            object.__setattr__(self, "tokenizer", str(self.tokenizer))

        if self.format not in FORMATS:
            _fail("format", self.format, f"choose one of {FORMATS}")
        if not isinstance(self.text_field, str) or not self.text_field:
            _fail("text_field", self.text_field, "must be a non-empty string")
        if self.tokenizer is not None and (
            not isinstance(self.tokenizer, str) or not self.tokenizer
        ):
            _fail("tokenizer", self.tokenizer, "a tokenizer.json path, or None for bytes")
        for name, low in [
            ("seq_len", 1),
            ("global_batch_size", 1),
            ("seed", 0),
            ("shuffle_window", 1),
            ("packing_bins", 1),
            ("read_threads", 0),
            ("prefetch_batches", 0),
            ("max_bad_records", 0),
        ]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _fail(name, value, f"must be an integer >= {low}")
        if self.num_epochs is not None and (
            isinstance(self.num_epochs, bool)
            or not isinstance(self.num_epochs, int)
            or self.num_epochs < 1
        ):
            _fail("num_epochs", self.num_epochs, "must be an integer >= 1, or None (forever)")
        if not isinstance(self.shuffle, bool):
            _fail("shuffle", self.shuffle, "must be true or false")
        if self.batch_ramp_start is not None:
            start, end = self.batch_ramp_start, self.global_batch_size
            inc = self.batch_ramp_increment or start
            object.__setattr__(self, "batch_ramp_increment", inc)
            if not 1 <= start <= end or (end - start) % inc:
                _fail(
                    "batch_ramp_start",
                    start,
                    f"need 1 <= it <= global_batch_size={end}, the difference a multiple of "
                    f"batch_ramp_increment={inc}",
                )
            if not self.batch_ramp_tokens or self.batch_ramp_tokens <= 0:
                _fail("batch_ramp_tokens", self.batch_ramp_tokens, "a positive token count")
        if not isinstance(self.document_masking, bool):
            _fail("document_masking", self.document_masking, "must be true or false")


def _stage_seed(seed: int, process_index: int, stage: int) -> int:
    """An independent 32-bit seed per (seed, host, stage); grain needs seeds < 2**32."""
    return int(np.random.SeedSequence([seed, process_index, stage]).generate_state(1)[0])


class _Tokenize(grain.transforms.Map):
    """document text -> int32 [bos, tokens..., eos]."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def map(self, text: str) -> np.ndarray:
        t = self._tokenizer
        return np.asarray([t.bos_id, *t.encode(text), t.eos_id], dtype=np.int32)


def make_dataset(
    cfg: DataConfig,
    *,
    process_index: int,
    process_count: int,
    seed: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> grain.IterDataset:
    """This host's stream of packed batches.

    Args:
      cfg: the data configuration.
      process_index: this host's index (`jax.process_index()`).
      process_count: number of hosts (`jax.process_count()`).
      seed: overrides `cfg.seed` when given.
      tokenizer: an already loaded tokenizer; by default `load_tokenizer(cfg.tokenizer)`.

    Returns:
      A grain IterDataset; each element is a dict of int32 arrays [B, T] with
      B = cfg.global_batch_size // process_count and T = cfg.seq_len, keyed by
      `packing.FEATURES` (`input_ids`, `labels`, `loss_mask`, `segment_ids`, `positions`).
      `iter()` of it is a `grain.DatasetIterator` with `get_state()` / `set_state()`.

    Raises:
      ValueError: bad host arguments, a batch that does not split over hosts, or a host
        without documents.
      FileNotFoundError: a data or tokenizer file is missing.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= {process_index=} < {process_count=}")
    if cfg.global_batch_size % process_count:
        raise ValueError(
            f"DataConfig.global_batch_size={cfg.global_batch_size} must be a multiple of "
            f"{process_count=}"
        )
    seed = cfg.seed if seed is None else seed
    if seed < 0:
        raise ValueError(f"{seed=} must be >= 0")
    local_batch = cfg.global_batch_size // process_count
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)

    source = open_source(cfg.paths, cfg.format, cfg.text_field, cfg.max_bad_records)
    docs = grain.MapDataset.source(source)[process_index::process_count]
    if len(docs) == 0:
        raise ValueError(
            f"host {process_index} of {process_count} gets no document: {cfg.paths} holds "
            f"{len(source)} documents"
        )
    check_not_empty(
        docs, tokenizer.encode, f"DataConfig.paths={list(cfg.paths)} (host {process_index})"
    )
    if cfg.shuffle:
        docs = docs.shuffle(seed=_stage_seed(seed, process_index, 0))
    docs = docs.repeat(cfg.num_epochs)
    tokens = docs.map(_Tokenize(tokenizer)).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)
    )
    chunks = grain.experimental.FlatMapIterDataset(tokens, ChunkDocument(cfg.seq_len))
    if cfg.shuffle:
        chunks = grain.experimental.WindowShuffleIterDataset(
            chunks, window_size=cfg.shuffle_window, seed=_stage_seed(seed, process_index, 1)
        )
    rows = pack(
        chunks,
        seq_len=cfg.seq_len,
        num_bins=cfg.packing_bins,
        pad_id=tokenizer.pad_id,
        seed=_stage_seed(seed, process_index, 2),
        shuffle_bins=cfg.shuffle,
    )
    if not cfg.document_masking:
        rows = rows.map(without_document_masks)
    if cfg.batch_ramp_start is not None:  # V3 Sec. 4.2: the batch follows the ramp
        plan = batch_plan(cfg)
        for b in plan.batch_sizes:
            if b % process_count:
                raise ValueError(f"DataConfig batch ramp size {b} must divide by {process_count=}")
        pad = functools.partial(pad_batch, pad_id=tokenizer.pad_id)
        batches = RampBatch(rows, plan, process_count, pad)
    else:
        batches = rows.batch(local_batch).map(
            functools.partial(pad_batch, batch_size=local_batch, pad_id=tokenizer.pad_id)
        )
    if cfg.prefetch_batches:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=cfg.prefetch_batches
        )
    return batches
