"""The per-host pipeline: config validation, determinism, checkpoint/resume and sharding."""

import json

import numpy as np
import pytest

from deepseek_jax.data import FEATURES, SHIPPED_TRAIN, DataConfig, make_dataset


def small_cfg(**overrides):
    """The shipped corpus at a size that keeps each test well under a second."""
    kw = dict(seq_len=32, global_batch_size=4, shuffle_window=32, packing_bins=8, read_threads=0)
    return DataConfig(**(kw | overrides))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert set(a) == set(b) == set(FEATURES)
        for k in FEATURES:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    """30 short documents, each fitting in one row, so a segment is a whole document."""
    path = tmp_path_factory.mktemp("pipeline") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"doc-{i:02d} " + "x" * (i % 7)}) + "\n" for i in range(30))
    )
    return path


def documents_of(batches):
    """Texts of the whole documents in `batches` (byte tokenizer: id = byte + 3)."""
    docs = []
    for b in batches:
        for ids, seg in zip(b["input_ids"], b["segment_ids"], strict=True):
            for s in np.unique(seg[seg > 0]):
                tokens = ids[seg == s]
                assert tokens[0] == 1  # bos: the segment starts a document
                docs.append(bytes(int(t) - 3 for t in tokens[1:]).decode())
    return docs


def test_shipped_default_config():
    cfg = DataConfig()
    assert cfg.paths == (str(SHIPPED_TRAIN),) and cfg.format == "jsonl"
    batch = next(iter(make_dataset(cfg, process_index=0, process_count=1)))
    assert set(batch) == set(FEATURES)
    for v in batch.values():
        assert v.shape == (cfg.global_batch_size, cfg.seq_len) and v.dtype == np.int32
    real = batch["loss_mask"] > 0
    assert not np.isin(batch["input_ids"][real], [0, 2]).any()  # pad and eos are never inputs
    assert not np.isin(batch["labels"][real], [0, 1]).any()  # pad and bos are never targets
    assert batch["input_ids"].max() < 2048 and batch["labels"].max() < 2048
    assert batch["loss_mask"].mean() > 0.9  # packing leaves little padding


def test_paths_are_normalised():
    assert DataConfig(paths="a.jsonl").paths == ("a.jsonl",)
    assert DataConfig(paths=["a.jsonl", "b.jsonl"]).paths == ("a.jsonl", "b.jsonl")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("paths", (), "DataConfig.paths=()"),
        ("format", "parquet", r"DataConfig.format='parquet' .*'jsonl'"),
        ("text_field", "", "DataConfig.text_field"),
        ("tokenizer", "", "DataConfig.tokenizer"),
        ("seq_len", 0, "DataConfig.seq_len=0 .* >= 1"),
        ("global_batch_size", 2.0, "DataConfig.global_batch_size"),
        ("seed", -1, "DataConfig.seed=-1"),
        ("num_epochs", 0, "DataConfig.num_epochs=0 .* or None"),
        ("shuffle", "yes", "DataConfig.shuffle"),
        ("packing_bins", 0, "DataConfig.packing_bins"),
        ("read_threads", -1, "DataConfig.read_threads"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**{field: value})


def test_host_arguments_are_checked():
    with pytest.raises(
        ValueError, match="global_batch_size=4 must be a multiple of process_count=3"
    ):
        make_dataset(small_cfg(), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 < process_count=2"):
        make_dataset(small_cfg(), process_index=2, process_count=2)


def test_missing_data_and_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        make_dataset(
            small_cfg(paths=str(tmp_path / "gone.jsonl")), process_index=0, process_count=1
        )
    with pytest.raises(FileNotFoundError, match="gone.json"):
        make_dataset(
            small_cfg(tokenizer=str(tmp_path / "gone.json")), process_index=0, process_count=1
        )


def test_same_seed_same_batches_other_seed_other_batches():
    def first(seed):
        return take(iter(make_dataset(small_cfg(), process_index=0, process_count=1, seed=seed)), 4)

    assert_same(first(3), first(3))
    other = first(4)
    assert any(
        (a["input_ids"] != b["input_ids"]).any() for a, b in zip(first(3), other, strict=True)
    )


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_replays_the_uninterrupted_run(threads):
    cfg = small_cfg(read_threads=threads, prefetch_batches=threads)
    it = iter(make_dataset(cfg, process_index=0, process_count=1))
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # the state must survive a JSON checkpoint
    expected = take(it, 6)

    fresh = iter(make_dataset(cfg, process_index=0, process_count=1))
    fresh.set_state(state)
    assert_same(take(fresh, 6), expected)


def test_resume_across_epoch_boundaries(doc_file):
    cfg = DataConfig(
        paths=str(doc_file),
        tokenizer=None,
        seq_len=24,
        global_batch_size=2,
        shuffle_window=4,
        packing_bins=2,
        read_threads=0,
    )
    it = iter(make_dataset(cfg, process_index=0, process_count=1))
    states, batches = [], []
    for _ in range(40):  # about three epochs of 30 documents
        states.append(it.get_state())
        batches.append(next(it))
    for k in (5, 17, 31):
        fresh = iter(make_dataset(cfg, process_index=0, process_count=1))
        fresh.set_state(states[k])
        assert_same(take(fresh, 4), batches[k : k + 4])


def test_epochs_repeat_with_a_new_order(doc_file):
    # Window 1 and one bin keep the document order visible in the output.
    cfg = DataConfig(
        paths=str(doc_file),
        tokenizer=None,
        seq_len=24,
        global_batch_size=2,
        num_epochs=2,
        shuffle_window=1,
        packing_bins=1,
        read_threads=0,
    )
    docs = documents_of(make_dataset(cfg, process_index=0, process_count=1))
    everything = sorted(f"doc-{i:02d} " + "x" * (i % 7) for i in range(30))
    first, second = docs[:30], docs[30:]
    assert sorted(first) == sorted(second) == everything
    assert first != second and first != everything


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_get_disjoint_covering_data(doc_file, hosts):
    cfg = DataConfig(
        paths=str(doc_file),
        tokenizer=None,
        seq_len=24,
        global_batch_size=6,
        num_epochs=1,
        shuffle_window=8,
        packing_bins=4,
        read_threads=0,
    )
    per_host = []
    for p in range(hosts):
        batches = list(make_dataset(cfg, process_index=p, process_count=hosts))
        assert all(b["input_ids"].shape == (6 // hosts, 24) for b in batches)
        per_host.append(documents_of(batches))
    seen = [d for docs in per_host for d in docs]
    assert len(seen) == len(set(seen)) == 30  # no document twice, none missing
    for a in range(hosts):
        for b in range(a + 1, hosts):
            assert not set(per_host[a]) & set(per_host[b])


def test_more_hosts_than_documents_is_an_error(doc_file):
    cfg = DataConfig(paths=str(doc_file), tokenizer=None, global_batch_size=32)
    with pytest.raises(ValueError, match="host 31 of 32 gets no document"):
        make_dataset(cfg, process_index=31, process_count=32)


def test_text_folder_feeds_the_pipeline(tmp_path):
    texts = [f"file {i}: " + "words " * i for i in range(5)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    cfg = DataConfig(
        paths=str(tmp_path),
        format="text",
        tokenizer=None,
        seq_len=64,
        global_batch_size=2,
        num_epochs=1,
        read_threads=0,
    )
    docs = documents_of(make_dataset(cfg, process_index=0, process_count=1))
    assert sorted(docs) == sorted(texts)
