"""Tokenizers: the shipped BPE, the byte fallback, and errors that name the file and token."""

import json

import pytest

from deepseek_jax.data import (
    SHIPPED_TOKENIZER,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

SAMPLES = [
    "",
    'The "assert" statement\n**********************\n\n   assert_stmt ::= ...',
    "  leading spaces, trailing tab\t\nand\r\nCRLF",
    "Unicode: héllo wörld, 日本語, emoji 🙂, combining é",
    "def f(x):\n    return x ** 2  # comment\n",
    "literal special names <|bos|> <|eos|> <|pad|> stay text",
]


@pytest.fixture(scope="module")
def bpe():
    return HFTokenizer(SHIPPED_TOKENIZER)


def test_shipped_bpe_vocab_and_specials(bpe):
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 2048
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)


@pytest.mark.parametrize("text", SAMPLES)
def test_shipped_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(3 <= i < bpe.vocab_size for i in ids)  # text never yields a special id
    assert bpe.decode(ids) == text


def test_shipped_bpe_compresses_english(bpe):
    text = "The import statement is used to bind a module to a name in the local namespace."
    assert len(bpe.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_fallback_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < tok.vocab_size == 259 for i in ids)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_load_tokenizer_dispatch():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(SHIPPED_TOKENIZER), HFTokenizer)


def test_missing_tokenizer_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
        load_tokenizer(missing)


def test_malformed_tokenizer_file_is_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer file .*tokenizer.json"):
        HFTokenizer(bad)


@pytest.fixture(scope="module")
def tiny_bpe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    tok = train_bpe(texts, vocab_size=280)
    assert tok.get_vocab_size() == 280
    tok.save(str(path))
    return path


def test_missing_special_token_is_named(tiny_bpe_file):
    with pytest.raises(ValueError, match="no bos_token '<s>'"):
        HFTokenizer(tiny_bpe_file, bos_token="<s>")


def test_hub_config_names_special_tokens(tiny_bpe_file):
    config = tiny_bpe_file.parent / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": {"content": "<|eos|>"}, "eos_token": "<|bos|>"}))
    try:
        tok = HFTokenizer(tiny_bpe_file)
    finally:
        config.unlink()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["abc"], vocab_size=100)
