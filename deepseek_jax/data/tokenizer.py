"""Tokenizers: a Hugging Face `tokenizer.json` through `tokenizers`, or plain UTF-8 bytes.

Both kinds expose the same small surface (`Tokenizer`): `encode` / `decode`, `vocab_size` and the
ids of the three special tokens the data pipeline needs: `bos_id` starts every document, `eos_id`
ends it, `pad_id` fills the unused tail of a packed row (always masked out of the loss).

The shipped `data/tokenizer.json` is a byte-level BPE with exactly 2048 ids trained by
`scripts/make_corpus.py` through `train_bpe`; its special tokens are `<|pad|>`=0, `<|bos|>`=1,
`<|eos|>`=2. `ByteTokenizer` uses the same three ids and puts byte `b` at id `b + 3`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Order fixes the ids: pad first so that zero-filled buffers read as padding.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0, 1, 2 are pad, bos, eos and byte `b` is id `b + 3`.

    The fallback when no tokenizer file is configured: it needs no training data and round-trips
    any string exactly, at the price of ~4x longer sequences than the shipped BPE.
    """

    _OFFSET = len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return 256 + self._OFFSET

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def encode(self, text: str) -> list[int]:
        return [b + self._OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self._OFFSET for i in ids if int(i) >= self._OFFSET)
        # A chunk may end inside a multi-byte character; show it rather than raise.
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (any model type `tokenizers` can load).

    Special tokens are looked up by name: the explicit arguments win, then the names in a
    `tokenizer_config.json` beside the file (hub convention), then this project's defaults
    (`<|bos|>`, `<|eos|>`, `<|pad|>`). A tokenizer without a pad token pads with eos, which is
    harmless because padded positions carry loss_mask 0.

    Args:
      path: the `tokenizer.json` file.
      bos_token: name of the begin-of-document token.
      eos_token: name of the end-of-document token.
      pad_token: name of the padding token.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file cannot be parsed, or lacks the bos/eos token.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(self.path)!r} does not exist")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot load tokenizer file {str(self.path)!r}: {e}") from e
        # A literal "<|eos|>" in a document is text, not a document boundary.
        self._tok.encode_special_tokens = True
        names = _hub_special_tokens(self.path.parent / "tokenizer_config.json")
        bos = bos_token or names.get("bos_token") or BOS_TOKEN
        eos = eos_token or names.get("eos_token") or EOS_TOKEN
        pad = pad_token or names.get("pad_token") or PAD_TOKEN
        self._bos_id = self._require_id(bos, "bos_token")
        self._eos_id = self._require_id(eos, "eos_token")
        pad_id = self._tok.token_to_id(pad)
        if pad_id is None and pad_token is not None:
            self._require_id(pad, "pad_token")
        self._pad_id = self._eos_id if pad_id is None else pad_id

    def _require_id(self, token: str, role: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            special = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())
            raise ValueError(
                f"tokenizer file {str(self.path)!r} has no {role} {token!r}; "
                f"its added tokens are {special[:10]}; pass {role}=... to choose one"
            )
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        # Special tokens are placed by the pipeline, never by the tokenizer's post-processor.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _hub_special_tokens(config_path: Path) -> dict[str, str]:
    """bos/eos/pad names from a hub `tokenizer_config.json` ({} when absent)."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(config_path)!r}: {e}") from e
    names = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        # Hub files store either the bare string or an AddedToken dict.
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer at `path`, or `ByteTokenizer()` when `path` is None.

    Args:
      path: a Hugging Face `tokenizer.json`, or None for UTF-8 bytes.

    Returns:
      A `Tokenizer`.
    """
    return ByteTokenizer() if path is None else HFTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE whose vocabulary has exactly `vocab_size` ids.

    Ids 0, 1, 2 are `SPECIAL_TOKENS`, then the 256 byte symbols, then the merges. Byte-level
    pre-tokenization makes every string encodable and decoding exact.

    Args:
      texts: training documents.
      vocab_size: total ids including special tokens and the 256 byte symbols.

    Returns:
      The trained `tokenizers.Tokenizer` (save it with `.save(path)`).

    Raises:
      ValueError: `vocab_size` is too small, or the texts allow too few merges to reach it.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"{vocab_size=} must be at least {256 + len(SPECIAL_TOKENS)}")
    tok = tokenizers.Tokenizer(models.BPE())
    # No prefix space: documents are encoded whole, so a leading space would be an invented byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise ValueError(
            f"BPE training reached {tok.get_vocab_size(with_added_tokens=True)} ids, not "
            f"{vocab_size=}: the training texts are too small"
        )
    return tok
