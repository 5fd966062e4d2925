"""Document masking is a choice (issue 11 item 8): V3 packs without cross-sample masking."""

import json

import numpy as np
import pytest

from deepseek_jax.data import DataConfig, make_dataset
from deepseek_jax.data.packing import without_document_masks


def _cfg(path, **kw):
    base = dict(
        paths=(str(path),),
        tokenizer=None,
        seq_len=48,
        global_batch_size=2,
        shuffle=False,
        packing_bins=2,
        read_threads=0,
    )
    return DataConfig(**(base | kw))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docmask") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} " + "y" * i}) + "\n" for i in range(12)))
    return path


def test_default_stays_masked(docs):
    assert DataConfig().document_masking is True
    batch = next(iter(make_dataset(_cfg(docs), process_index=0, process_count=1)))
    assert batch["segment_ids"].max() > 1  # several documents per row, one segment each


def test_v3_packing_has_one_segment_and_running_positions(docs):
    masked = next(iter(make_dataset(_cfg(docs), process_index=0, process_count=1)))
    cfg = _cfg(docs, document_masking=False)
    batch = next(iter(make_dataset(cfg, process_index=0, process_count=1)))
    for k in ("input_ids", "labels", "loss_mask"):  # the same tokens, only the masks differ
        np.testing.assert_array_equal(batch[k], masked[k], err_msg=k)
    real = masked["segment_ids"] > 0
    np.testing.assert_array_equal(batch["segment_ids"], real.astype(np.int32))
    for row in range(real.shape[0]):
        n = int(real[row].sum())
        np.testing.assert_array_equal(batch["positions"][row][real[row]], np.arange(n))
    assert (batch["positions"][~real] == 0).all()


def test_without_document_masks_by_hand():
    ex = {
        "input_ids": np.array([5, 6, 7, 8, 0]),
        "labels": np.array([6, 9, 8, 9, 0]),
        "loss_mask": np.array([1, 1, 1, 1, 0]),
        "segment_ids": np.array([1, 1, 2, 2, 0]),
        "positions": np.array([0, 1, 0, 1, 0]),
    }
    out = without_document_masks(ex)
    np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(out["positions"], [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(out["labels"], ex["labels"])


def test_document_masking_must_be_bool():
    with pytest.raises(ValueError, match="DataConfig.document_masking"):
        DataConfig(document_masking="no")
