"""Builds the shipped corpus and tokenizer in data/ from text that comes with CPython.

Sources (both under the PSF License Version 2, which permits redistribution; see
data/LICENSE-PSF.txt):

* `pydoc_data.topics` — the Python Language Reference / library topics that `help()` shows;
  one document per topic.
* the docstrings of the pure-Python standard library, read with `ast` (nothing is imported);
  one document per module: the module docstring, then each public class / function / method
  docstring under its qualified name.

Documents go to `pydoc_train.jsonl` or `pydoc_valid.jsonl` ({"id": ..., "text": ...} per line;
about 1 in 20 documents, chosen by a hash of the id, is held out). A byte-level BPE with
exactly 2048 ids is trained on the train split and saved as `tokenizer.json`.

The output depends only on the CPython version (the shipped files come from CPython 3.11.7) and
the `tokenizers` version (0.23.3). `--check` rebuilds into a temporary folder and compares the
bytes with the shipped files.

Usage:
  python scripts/make_corpus.py [--out data] [--check]
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

# BPE training is multi-threaded; one thread keeps merge tie-breaking independent of the machine.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from deepseek_jax.data.tokenizer import train_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 2048
VALID_EVERY = 20  # hold out ~1/VALID_EVERY of the documents
OUTPUTS = ("pydoc_train.jsonl", "pydoc_valid.jsonl", "tokenizer.json", "LICENSE-PSF.txt")
# Test suites, GUI demos, generated tables and vendored code are not prose worth learning from.
SKIP_TOP = {
    "site-packages",
    "test",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "encodings",
    "config-3.11-x86_64-linux-gnu",
    "__phello__",
}


def topic_documents() -> Iterator[tuple[str, str]]:
    """(id, text) for each `pydoc_data.topics` topic, in key order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_topics/{name}", topics[name].strip()


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _docstrings(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of public classes and functions below `node`, source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if not _public(child.name):
                continue
            name = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                yield name, doc
            if isinstance(child, ast.ClassDef):
                yield from _docstrings(child, name)


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """(id, text) per standard-library module with docstrings, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in SKIP_TOP or "test" in parts or "tests" in parts:
            continue
        if path.name.startswith("_sysconfigdata"):  # generated per platform
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        sections = []
        doc = ast.get_docstring(tree)
        if doc:
            sections.append(f"Module {module}\n\n{doc}")
        sections += [f"{name}\n\n{text}" for name, text in _docstrings(tree, module)]
        if sections:
            yield f"stdlib/{module}", "\n\n\n".join(sections)


def is_valid(doc_id: str) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % VALID_EVERY == 0


def build(out: Path) -> None:
    """Writes OUTPUTS into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    train_texts = []
    with (
        open(out / "pydoc_train.jsonl", "w", encoding="utf-8") as train,
        open(out / "pydoc_valid.jsonl", "w", encoding="utf-8") as valid,
    ):
        for doc_id, text in [*topic_documents(), *stdlib_documents()]:
            line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
            if is_valid(doc_id):
                valid.write(line)
            else:
                train.write(line)
                train_texts.append(text)
    train_bpe(train_texts, VOCAB_SIZE).save(str(out / "tokenizer.json"))
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", out / "LICENSE-PSF.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data")
    parser.add_argument("--check", action="store_true", help="rebuild and compare with --out")
    args = parser.parse_args()
    print(f"CPython {sys.version.split()[0]}", file=sys.stderr)
    if not args.check:
        build(args.out)
        for name in OUTPUTS:
            print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        differ = [n for n in OUTPUTS if not filecmp.cmp(Path(tmp) / n, args.out / n, shallow=False)]
    for name in differ:
        print(f"{args.out / name} differs from a rebuild", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
