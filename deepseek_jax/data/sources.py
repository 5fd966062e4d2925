"""Document sources: random-access sequences of document strings read from files.

Each source implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`), so
`grain.MapDataset.source(src)` can shard and shuffle documents by index without reading them.

Formats (`DataConfig.format`):

* `"text"` — UTF-8 plain-text files, **one document per file** (a folder of articles or books is
  the common layout; a blank line inside a file is a paragraph break, not a document break).
* `"jsonl"` — one JSON object per non-blank line; the document is the string at `text_field`.
* `"arrayrecord"` — ArrayRecord files (grain's `ArrayRecordDataSource`) whose records are UTF-8
  JSON objects like a JSONL line; the document is the string at `text_field`.

Parquet is not offered: grain's `ParquetIterDataset` needs `pyarrow`, which is not a dependency,
and it is sequential-only, so it could not be sharded and shuffled by document like the rest.

A path may be a file, a folder (searched recursively for the format's suffixes) or a glob
pattern; files are taken in sorted order so that document indices are stable across hosts.
"""

from __future__ import annotations

import glob
import json
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import numpy as np

FORMATS = ("text", "jsonl", "arrayrecord")
SUFFIXES = {
    "text": (".txt",),
    "jsonl": (".jsonl",),
    "arrayrecord": (".array_record", ".arrayrecord"),
}


def resolve_files(paths: Sequence[str | Path], format: str) -> list[Path]:
    """Expands files, folders and glob patterns into a sorted list of files.

    Args:
      paths: files, folders or glob patterns (`DataConfig.paths`).
      format: one of `FORMATS`; picks the suffixes searched for in folders.

    Returns:
      The files, each path's expansion sorted, in the order of `paths`.

    Raises:
      FileNotFoundError: a path does not exist or expands to no file.
    """
    if format not in SUFFIXES:
        raise ValueError(f"format={format!r} is unsupported: choose one of {FORMATS}")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if glob.has_magic(str(raw)):
            found = sorted(Path(p) for p in glob.glob(str(raw), recursive=True))
            found = [p for p in found if p.is_file()]
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES[format]
            )
        elif path.is_file():
            found = [path]
        else:
            raise FileNotFoundError(f"DataConfig.paths: {str(raw)!r} does not exist")
        if not found:
            raise FileNotFoundError(
                f"DataConfig.paths: {str(raw)!r} matches no {format} file "
                f"(folders are searched for {SUFFIXES[format]})"
            )
        files += found
    return files


def text_of_record(record: str | bytes, text_field: str, where: str) -> str:
    """The document string at `text_field` of one JSON object.

    Args:
      record: the serialised JSON object (a JSONL line or an ArrayRecord record).
      text_field: key of the document text.
      where: the record's place (`file:line`), for error messages.

    Raises:
      ValueError: the record is not a JSON object or has no string at `text_field`.
    """
    try:
        obj = json.loads(record)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise ValueError(
            f"{where}: no field {text_field!r} (DataConfig.text_field); "
            f"the record has fields {sorted(obj)}"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{where}: field {text_field!r} (DataConfig.text_field) is a "
            f"{type(text).__name__}, expected a string"
        )
    return text


class BadRecords:
    """Skips unreadable records (invalid JSON or UTF-8, a missing text field), up to a limit.

    A skipped record reads as an empty document, which the pipeline drops; each one is reported
    once, with its place and the running count of distinct bad records (a later epoch reading it
    again neither counts nor reports it again). Thread-safe (grain reads with several threads).

    Args:
      limit: records that may be skipped (`DataConfig.max_bad_records`); 0 = none, the first
        bad record raises.
    """

    def __init__(self, limit: int = 0):
        self.limit = limit
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Distinct records skipped so far."""
        return len(self._seen)

    def skip(self, index: int, error: ValueError) -> str:
        """Counts record `index` (its read raised `error`) as skipped and returns "", or raises
        past the limit."""
        with self._lock:
            if index in self._seen:
                return ""
            if self.count >= self.limit:
                if self.limit == 0:
                    raise error
                raise ValueError(
                    f"{error} — more than DataConfig.max_bad_records={self.limit} bad records"
                ) from error
            self._seen.add(index)
            n = self.count
        warnings.warn(
            f"skipped bad record {n} (DataConfig.max_bad_records={self.limit}): {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return ""


class TextFileSource:
    """One document per UTF-8 text file.

    Args:
      files: the files, in document order.
      bad: skips unreadable files (not UTF-8) up to its limit; None = raise.
    """

    def __init__(self, files: Sequence[str | Path], bad: BadRecords | None = None):
        self._files = [str(f) for f in files]
        self.bad = bad or BadRecords()

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> str:
        try:
            return self._read(index)
        except ValueError as e:
            return self.bad.skip(index, e)

    def _read(self, index: int) -> str:
        path = self._files[index]
        try:
            return Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path!r} is not UTF-8 text ({e})") from e

    def __repr__(self) -> str:
        return f"TextFileSource({len(self)} files)"


class JsonlSource:
    """One document per non-blank line of JSONL files, taken from `text_field`.

    Only line offsets are kept in memory (one scan at construction); a line is read and parsed
    when its document is requested. The first record of every file is parsed eagerly so that a
    wrong `text_field` fails at start-up rather than mid-training.

    Args:
      files: the files, in document order.
      text_field: key of the document text in each object.
      bad: skips bad records up to its limit; None = raise on the first.

    Raises:
      ValueError: a file has no records, or its first record lacks `text_field`.
    """

    def __init__(self, files: Sequence[str | Path], text_field: str, bad: BadRecords | None = None):
        self._files = [str(f) for f in files]
        self._text_field = text_field
        self.bad = bad or BadRecords()
        file_ids, offsets, lengths, line_numbers, firsts = [], [], [], [], []
        for file_id, path in enumerate(self._files):
            offset, count = 0, 0
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        file_ids.append(file_id)
                        offsets.append(offset)
                        lengths.append(len(line))
                        line_numbers.append(line_number)
                        count += 1
                    offset += len(line)
            if count == 0:
                raise ValueError(f"{path!r} has no JSONL records")
            firsts.append(len(offsets) - count)
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        for index in firsts:
            self[index]  # raises on a wrong text_field now rather than mid-training

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        try:
            return self._read(index)
        except ValueError as e:
            return self.bad.skip(index, e)

    def _read(self, index: int) -> str:
        path = self._files[self._file_ids[index]]
        with open(path, "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.read(int(self._lengths[index]))
        where = f"{path}:{self._line_numbers[index]}"
        return text_of_record(line, self._text_field, where)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._files)} files, {len(self)} documents)"


class ArrayRecordSource:
    """One document per ArrayRecord record, a UTF-8 JSON object with the text at `text_field`.

    Args:
      files: the ArrayRecord files, in document order.
      text_field: key of the document text in each object.
      bad: skips bad records up to its limit; None = raise on the first.
    """

    def __init__(self, files: Sequence[str | Path], text_field: str, bad: BadRecords | None = None):
        self._files = [str(f) for f in files]
        self._text_field = text_field
        self.bad = bad or BadRecords()
        self._records = grain.sources.ArrayRecordDataSource(self._files)
        if len(self._records) == 0:
            raise ValueError(f"ArrayRecord files {self._files} have no records")
        self[0]  # raises on a wrong text_field now rather than mid-training

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        try:
            return self._read(index)
        except ValueError as e:
            return self.bad.skip(index, e)

    def _read(self, index: int) -> str:
        where = f"record {index} of {self._files}"
        return text_of_record(self._records[index], self._text_field, where)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._files)} files, {len(self)} documents)"


DocumentSource = TextFileSource | JsonlSource | ArrayRecordSource


def open_source(
    paths: Sequence[str | Path], format: str, text_field: str = "text", max_bad_records: int = 0
) -> DocumentSource:
    """Opens the documents at `paths` as a random-access source of strings.

    Args:
      paths: files, folders or glob patterns.
      format: one of `FORMATS`.
      text_field: key of the document text ("jsonl" and "arrayrecord").
      max_bad_records: unreadable records skipped (reported, counted) before one raises.

    Returns:
      A source whose item `i` is document `i` (a `str`).

    Raises:
      FileNotFoundError: a path does not exist or matches no file.
      ValueError: unsupported format, or a first record lacks `text_field`.
    """
    files = resolve_files(paths, format)
    bad = BadRecords(max_bad_records)
    if format == "text":
        return TextFileSource(files, bad)
    if format == "jsonl":
        return JsonlSource(files, text_field, bad)
    return ArrayRecordSource(files, text_field, bad)


def check_not_empty(docs: Sequence[str], encode: Callable[[str], Sequence[int]], where: str):
    """Raises unless some document of `docs` has at least one token.

    The pipeline drops empty documents, so a corpus of only empty ones would make the batch
    iterator search forever. Reads documents in order until the first non-empty one (at once
    for any normal corpus; the whole corpus only when it is all empty).

    Raises:
      ValueError: every document is empty (or was skipped as bad), naming `where`.
    """
    for i in range(len(docs)):
        if len(encode(docs[i])) > 0:
            return
    raise ValueError(
        f"{where}: all {len(docs)} documents are empty (or unreadable and skipped): there is "
        "nothing to train on"
    )
