"""Packing tokenized documents into fixed-length rows that attention cannot see across.

A document is tokenized as `d = [bos, t_1, ..., t_n, eos]`. Its next-token pairs are formed
*before* packing: `input_ids = d[:-1]`, `labels = d[1:]`, so the label of every input position is
the next token of the same document, and `eos` appears only as a label (the position whose target
would lie in the next document does not exist at all, rather than being masked).

A document with more than `seq_len` pairs is cut into chunks of `seq_len` pairs (the last one
shorter). Because the pairs were formed first, the last position of a chunk keeps its true label,
the first token of the next chunk: no target is lost or masked at a chunk boundary. Each chunk is
its own segment: it cannot attend to the previous chunk (which may sit in another row) and its
positions restart at 0.

Chunks are packed first-fit into rows of length T = seq_len with grain's
`FirstFitPackIterDataset`; a chunk is never split across rows. A packed example has int32 arrays
of shape [T]:

* `input_ids`   — tokens; `pad_id` where unused.
* `labels`      — next token of the same document; `pad_id` where unused.
* `loss_mask`   — 1 on real tokens, 0 on padding.
* `segment_ids` — 1, 2, ... per chunk within the row; 0 on padding.
* `positions`   — position within the chunk, restarting at 0 per segment; 0 on padding.

Query i may attend to key j iff `segment_ids[i] == segment_ids[j] != 0` and `j <= i`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import grain
import numpy as np

FEATURES = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")


def document_pairs(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token pairs of one document.

    Args:
      tokens: [n] int32, `[bos, ..., eos]`.

    Returns:
      `input_ids` [n-1] and `labels` [n-1] with `labels[i] == tokens[i + 1]`.
    """
    return {"input_ids": tokens[:-1], "labels": tokens[1:]}


class ChunkDocument(grain.experimental.FlatMapTransform):
    """Splits one document's tokens into next-token pairs of at most `seq_len` positions.

    Args:
      seq_len: T, the row length.
    """

    # Unused by FlatMapIterDataset (it is a MapDataset bound); kept for the FlatMap contract.
    max_fan_out = 1 << 30

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
        """tokens [n] -> chunks with `input_ids`, `labels` [<= seq_len] (none if n < 3)."""
        if len(tokens) < 3:  # [bos, eos]: an empty document teaches nothing
            return []
        pairs = document_pairs(tokens)
        n, t = len(pairs["labels"]), self.seq_len
        return [{k: v[s : s + t] for k, v in pairs.items()} for s in range(0, n, t)]


def to_example(packed: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Converts one row of `FirstFitPackIterDataset` output into the packed-example layout.

    Args:
      packed: `input_ids`, `labels` [T] and their `*_segment_ids`, `*_positions` [T]; the two
        features have identical segment ids because they are packed pairwise.
      pad_id: token written where the row is unused.

    Returns:
      The example dict (`FEATURES`, int32 [T]).
    """
    segment_ids = packed["input_ids_segment_ids"].astype(np.int32)
    real = segment_ids > 0
    return {
        "input_ids": np.where(real, packed["input_ids"], pad_id).astype(np.int32),
        "labels": np.where(real, packed["labels"], pad_id).astype(np.int32),
        "loss_mask": real.astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.where(real, packed["input_ids_positions"], 0).astype(np.int32),
    }


def without_document_masks(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DeepSeek-V3's packing (V3 report Sec. 4.1): no cross-sample attention masking.

    Every real token of the row joins segment 1, so attention spans the documents packed into
    it (padding keeps segment 0 and stays masked), and positions count on across the row instead
    of restarting per document. Labels are untouched: each is still its own document's next
    token, so no target crosses a document boundary.

    Args:
      example: a packed example (`FEATURES`, int32 [T]).
    Returns:
      The example with `segment_ids` in {0, 1} and `positions` = index among the real tokens.
    """
    real = np.asarray(example["segment_ids"]) > 0
    out = dict(example)
    out["segment_ids"] = real.astype(np.int32)
    out["positions"] = np.where(real, np.cumsum(real) - 1, 0).astype(np.int32)
    return out


def pack(
    chunks: grain.IterDataset,
    *,
    seq_len: int,
    num_bins: int,
    pad_id: int,
    seed: int,
    shuffle_bins: bool,
) -> grain.IterDataset:
    """Packs chunks first-fit into rows of `seq_len` positions.

    Args:
      chunks: elements `{"input_ids": [n], "labels": [n]}` with n <= seq_len.
      seq_len: T.
      num_bins: rows filled at once; more bins means less padding and more reordering.
      pad_id: token written on unused positions.
      seed: seed of the row shuffle.
      shuffle_bins: emit the rows of each packed group in a seeded random order.

    Returns:
      An IterDataset of packed examples (`FEATURES`, int32 [T]).
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks,
        length_struct={"input_ids": seq_len, "labels": seq_len},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
    )
    return packed.map(functools.partial(to_example, pad_id=pad_id))


def pad_batch(
    batch: Mapping[str, np.ndarray], batch_size: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Pads a short final batch with empty rows (`pad_id` tokens, segment 0, loss_mask 0).

    Keeps every batch at [B, T] so that a finite stream never changes the jitted shapes.

    Args:
      batch: example arrays [b, T] with b <= batch_size.
      batch_size: B.
      pad_id: token written in the added rows.

    Returns:
      Arrays [B, T].
    """
    missing = batch_size - len(batch["input_ids"])
    if missing == 0:
        return dict(batch)
    fill = {"input_ids": pad_id, "labels": pad_id}
    return {
        k: np.pad(v, ((0, missing), (0, 0)), constant_values=fill.get(k, 0))
        for k, v in batch.items()
    }
