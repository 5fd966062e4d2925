"""Document sources: formats, text_field, path expansion, and errors naming file and field."""

import json

import pytest

from deepseek_jax.data import SHIPPED_TRAIN, SHIPPED_VALID, open_source
from deepseek_jax.data.sources import resolve_files


def write_jsonl(path, records, blank_lines=False):
    lines = [json.dumps(r) for r in records]
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(lines) + "\n", encoding="utf-8")
    return path


def test_shipped_corpus_is_real_prose():
    train = open_source([SHIPPED_TRAIN], "jsonl")
    valid = open_source([SHIPPED_VALID], "jsonl")
    assert len(train) > 400 and len(valid) > 10
    total = sum(len(train[i]) for i in range(len(train)))
    assert 1_000_000 < total < 3_000_000
    assert any("assert" in train[i] for i in range(100))


def test_jsonl_default_and_custom_text_field(tmp_path):
    records = [{"text": f"doc {i}", "body": f"body {i}", "n": i} for i in range(5)]
    path = write_jsonl(tmp_path / "a.jsonl", records, blank_lines=True)
    assert [open_source([path], "jsonl")[i] for i in range(5)] == [f"doc {i}" for i in range(5)]
    body = open_source([str(path)], "jsonl", text_field="body")
    assert len(body) == 5 and body[3] == "body 3"


def test_jsonl_unicode_offsets(tmp_path):
    records = [{"text": "日本語 " * (i + 1)} for i in range(4)]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), "utf-8")
    src = open_source([path], "jsonl")
    assert [src[i] for i in range(4)] == [r["text"] for r in records]


def test_jsonl_missing_field_names_field_and_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no field 'text' .*\['content'\]"):
        open_source([path], "jsonl")


def test_jsonl_bad_record_found_lazily_names_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 3}\n[1]\n{broken\n')
    src = open_source([path], "jsonl")
    with pytest.raises(ValueError, match=r"a\.jsonl:2: field 'text' .* is a int"):
        src[1]
    with pytest.raises(ValueError, match=r"a\.jsonl:3: expected a JSON object"):
        src[2]
    with pytest.raises(ValueError, match=r"a\.jsonl:4: not valid JSON"):
        src[3]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="DataConfig.paths: .*missing.jsonl"):
        open_source([tmp_path / "missing.jsonl"], "jsonl")
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl' matches no jsonl file"):
        open_source([str(tmp_path / "*.jsonl")], "jsonl")


def test_text_files_one_document_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second\n\nstill second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "ignored.md").write_text("not a .txt")
    src = open_source([tmp_path], "text")
    assert [src[i] for i in range(len(src))] == ["first", "second\n\nstill second", "third"]


def test_glob_and_multiple_paths_keep_order(tmp_path):
    for name in ["x1", "x2"]:
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
    write_jsonl(tmp_path / "y.jsonl", [{"text": "y"}])
    files = resolve_files([tmp_path / "y.jsonl", str(tmp_path / "x*.jsonl")], "jsonl")
    assert [f.name for f in files] == ["y.jsonl", "x1.jsonl", "x2.jsonl"]
    src = open_source([tmp_path / "y.jsonl", str(tmp_path / "x*.jsonl")], "jsonl")
    assert [src[i] for i in range(3)] == ["y", "x1", "x2"]


def test_arrayrecord_source(tmp_path):
    array_record = pytest.importorskip("array_record.python.array_record_module")
    path = tmp_path / "docs.array_record"
    writer = array_record.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(3):
        writer.write(json.dumps({"body": f"record {i}"}).encode())
    writer.close()
    src = open_source([tmp_path], "arrayrecord", text_field="body")
    assert [src[i] for i in range(len(src))] == ["record 0", "record 1", "record 2"]
    with pytest.raises(ValueError, match="no field 'text'"):
        open_source([path], "arrayrecord")


def test_unsupported_format_lists_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"format='parquet' .*\('text', 'jsonl', 'arrayrecord'\)"):
        open_source([tmp_path], "parquet")
