"""Packing: rows never let a position see or predict another document.

The end-to-end tests run the real pipeline with a tokenizer whose ids name their document and
position (token j of document i is 1000 * (i + 1) + j), so every check is exact.
"""

import collections
import json

import numpy as np
import pytest

from deepseek_jax.data import FEATURES, DataConfig, make_dataset
from deepseek_jax.data.packing import ChunkDocument, pad_batch, to_example

BOS, EOS, PAD = 1, 2, 0
SEQ_LEN = 16
# Lengths around the row length on purpose: empty, 1, T-1, T, T+1 and several rows long.
DOC_LENGTHS = [0, 1, 5, SEQ_LEN - 2, SEQ_LEN - 1, SEQ_LEN, SEQ_LEN + 1, 3 * SEQ_LEN + 5, 2, 9, 40]


class PositionTokenizer:
    """Text "i n" -> the n ids 1000 * (i + 1) + j; the ids identify document and position."""

    vocab_size, pad_id, bos_id, eos_id = 1_000_000, PAD, BOS, EOS

    def encode(self, text):
        doc, n = map(int, text.split())
        return [1000 * (doc + 1) + j for j in range(n)]

    def decode(self, ids):
        return " ".join(map(str, ids))


def doc_of(token):
    return None if token in (BOS, EOS, PAD) else token // 1000 - 1


def next_token(token, doc):
    """The token after `token` in document `doc`."""
    n = DOC_LENGTHS[doc]
    j = -1 if token == BOS else token % 1000
    return EOS if j + 1 == n else 1000 * (doc + 1) + j + 1


def all_pairs():
    """Every (input, label) pair of every non-empty document."""
    pairs = collections.Counter()
    for doc, n in enumerate(DOC_LENGTHS):
        if n == 0:
            continue
        tokens = [BOS] + [1000 * (doc + 1) + j for j in range(n)] + [EOS]
        pairs.update(zip(tokens[:-1], tokens[1:], strict=True))
    return pairs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"{i} {n}"}) + "\n" for i, n in enumerate(DOC_LENGTHS))
    )
    return path


def epoch_rows(corpus, shuffle, batch=3, bins=4):
    cfg = DataConfig(
        paths=(str(corpus),),
        seq_len=SEQ_LEN,
        global_batch_size=batch,
        shuffle=shuffle,
        num_epochs=1,
        packing_bins=bins,
        shuffle_window=8,
        read_threads=0,
    )
    ds = make_dataset(cfg, process_index=0, process_count=1, tokenizer=PositionTokenizer())
    batches = list(ds)
    for b in batches:
        assert set(b) == set(FEATURES)
        assert all(v.shape == (batch, SEQ_LEN) and v.dtype == np.int32 for v in b.values())
    return [{k: v[r] for k, v in b.items()} for b in batches for r in range(batch)]


def attention_mask(segment_ids):
    """[T] -> [T, T] bool: query i sees key j iff same non-zero segment and j <= i."""
    same = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[:, None] > 0)
    return same & np.tril(np.ones((len(segment_ids),) * 2, bool))


def segment_doc(row, seg):
    """The one document of a segment (its labels always name it, unlike a leading bos)."""
    docs = {doc_of(t) for t in row["labels"][row["segment_ids"] == seg]} - {None}
    docs |= {doc_of(t) for t in row["input_ids"][row["segment_ids"] == seg]} - {None}
    assert len(docs) == 1, f"segment {seg} mixes documents {docs}"
    return docs.pop()


@pytest.mark.parametrize("shuffle", [False, True])
def test_rows_never_cross_documents(corpus, shuffle):
    for row in epoch_rows(corpus, shuffle):
        seg, pos = row["segment_ids"], row["positions"]
        real = seg > 0
        np.testing.assert_array_equal(row["loss_mask"], real.astype(np.int32))
        # Segments are contiguous, numbered 1, 2, ... from the left, padding only at the end.
        ids = seg[real]
        assert real[: len(ids)].all() and not real[len(ids) :].any()
        np.testing.assert_array_equal(np.unique(ids), np.arange(1, ids.max(initial=0) + 1))
        assert (np.diff(ids) >= 0).all()
        assert (row["input_ids"][~real] == PAD).all() and (row["labels"][~real] == PAD).all()
        for s in np.unique(ids):
            where = seg == s
            np.testing.assert_array_equal(pos[where], np.arange(where.sum()))  # restart at 0
            doc = segment_doc(row, s)
            for x, y in zip(row["input_ids"][where], row["labels"][where], strict=True):
                assert y == next_token(x, doc), "label is not the next token of the document"
        # Every pair the causal segment mask allows lies inside one document.
        mask = attention_mask(seg)
        doc_at = np.array([segment_doc(row, s) if s else -1 for s in seg])
        q, k = np.nonzero(mask)
        assert (doc_at[q] == doc_at[k]).all()
        assert not mask[~real].any() and not mask[:, ~real].any()


@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_holds_every_pair_once(corpus, shuffle):
    seen = collections.Counter()
    for row in epoch_rows(corpus, shuffle):
        real = row["loss_mask"] > 0
        seen.update(zip(row["input_ids"][real].tolist(), row["labels"][real].tolist(), strict=True))
    assert seen == all_pairs()  # chunk boundaries lose and repeat nothing


def test_chunk_boundary_keeps_true_label():
    tokens = np.array([BOS, 10, 11, 12, 13, EOS], np.int32)
    chunks = ChunkDocument(seq_len=2).flat_map(tokens)
    assert [c["input_ids"].tolist() for c in chunks] == [[BOS, 10], [11, 12], [13]]
    # The last label of a chunk is the first input of the next chunk.
    assert [c["labels"].tolist() for c in chunks] == [[10, 11], [12, 13], [EOS]]
    assert ChunkDocument(seq_len=2).flat_map(np.array([BOS, EOS], np.int32)) == []


def test_to_example_pads_with_pad_id():
    packed = {
        "input_ids": np.array([5, 6, 0, 0]),
        "labels": np.array([6, 7, 0, 0]),
        "input_ids_segment_ids": np.array([1, 1, 0, 0]),
        "input_ids_positions": np.array([0, 1, 0, 0]),
    }
    ex = to_example(packed, pad_id=9)
    np.testing.assert_array_equal(ex["input_ids"], [5, 6, 9, 9])
    np.testing.assert_array_equal(ex["labels"], [6, 7, 9, 9])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 0])
    assert all(v.dtype == np.int32 for v in ex.values())


def test_pad_batch_adds_empty_rows():
    batch = {k: np.ones((1, 4), np.int32) for k in FEATURES}
    out = pad_batch(batch, batch_size=3, pad_id=7)
    assert all(v.shape == (3, 4) for v in out.values())
    assert (out["input_ids"][1:] == 7).all() and (out["labels"][1:] == 7).all()
    assert (out["loss_mask"][1:] == 0).all() and (out["segment_ids"][1:] == 0).all()
