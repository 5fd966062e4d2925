"""Chat data for post-training: JSONL records, chat templates, response masks and packing.

Record formats (one JSON object per line):
  * SFT:  `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
  * DPO:  `{"prompt": str | messages, "chosen": str, "rejected": str}`
  * GRPO: `{"prompt": str | messages, "answer": str}` (other fields are kept for reward functions)
A string prompt is one user message.

A template renders messages to token ids plus a `target_mask` that is True on the tokens the
assistant wrote (its replies and the end-of-turn token that closes each), the only tokens that
enter the loss. Two templates:
  * `SimpleChatTemplate` (ours, for the project tokenizer): DeepSeek LLM's chat layout,
    `<bos>User: {u}\\n\\nAssistant: {a}<eos>`, system text first as `{s}\\n\\n`; each piece is
    encoded separately, so the mask follows the pieces exactly.
  * `JinjaChatTemplate`: a checkpoint's `chat_template` from `tokenizer_config.json`, rendered with
    jinja2 like Hugging Face does. Assistant spans are found by rendering each conversation prefix
    with `add_generation_prompt=True` (what a sampler would see) and the conversation through that
    reply; the reply is the text in between. The whole text is encoded once (special tokens
    recognised) and a token is a target when its first character lies in a reply span.

Examples are next-token pairs, `input_ids = ids[:-1]`, `labels = ids[1:]`,
`loss_mask = target_mask[1:]`, and `pack_examples` packs them first-fit into rows with
`segment_ids` and per-segment `positions` (layout of data/packing.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import jinja2
import jinja2.sandbox
import numpy as np
import tokenizers

from deepseek_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
PAIR_FEATURES = ("input_ids", "labels", "loss_mask")


class Rendered(NamedTuple):
    ids: np.ndarray  # [n] int32
    target_mask: np.ndarray  # [n] bool: written by the assistant (a loss target)


class ChatTemplate(Protocol):
    """What the chat loaders need from a template."""

    pad_id: int
    eos_id: int

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> Rendered:
        """Token ids of `messages` and their assistant mask."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ChatDataError(ValueError):
    """A malformed chat record; the message names the file and line."""


def validate_messages(messages, where: str) -> list[dict]:
    """Checks a message list: a non-empty list of {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatDataError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}"
            )
        if m["role"] not in ROLES:
            raise ChatDataError(f"{where}: messages[{i}].role={m['role']!r} must be one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ChatDataError(f"{where}: messages[{i}].content must be a string")
    return messages


class SimpleChatTemplate:
    """DeepSeek LLM's chat layout for a project `Tokenizer` (bos/eos ids, no special text).

    `<bos>` + for each message: system `{s}\\n\\n`, user `User: {u}\\n\\n`, assistant
    `Assistant: {a}<eos>`; the generation prompt is `Assistant:`. Targets: ` {a}` and `<eos>`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id, self.bos_id = tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> Rendered:
        messages = validate_messages(list(messages), "messages")
        enc = self.tokenizer.encode
        ids, mask = [self.bos_id], [False]

        def add(tokens, target):
            ids.extend(tokens)
            mask.extend([target] * len(tokens))

        for m in messages:
            if m["role"] == "system":
                add(enc(m["content"] + "\n\n"), False)
            elif m["role"] == "user":
                add(enc("User: " + m["content"] + "\n\n"), False)
            else:
                add(enc("Assistant:"), False)
                add(enc(" " + m["content"]) + [self.eos_id], True)
        if add_generation_prompt:
            add(enc("Assistant:"), False)
        return Rendered(np.asarray(ids, np.int32), np.asarray(mask, bool))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class JinjaChatTemplate:
    """A Hugging Face chat template (jinja2, sandboxed) over a `tokenizers.Tokenizer`.

    Args:
      template: the jinja source (`tokenizer_config.json` "chat_template").
      tokenizer: the checkpoint's tokenizer (special tokens in the text are recognised).
      bos_token, eos_token: the strings the template sees as `bos_token` / `eos_token`.
      pad_token: padding token name; None pads with eos (padding never enters the loss).
      source: where the template came from, for error messages.
    """

    def __init__(
        self,
        template: str,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str | None = None,
        source: str = "chat_template",
    ):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"{source}: cannot parse the chat template: {e}") from e
        self.tokenizer, self.source = tokenizer, source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.eos_id = self._token_id(eos_token, "eos_token")
        self.pad_id = self.eos_id if pad_token is None else self._token_id(pad_token, "pad_token")

    def _token_id(self, token: str, role: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: {role} {token!r} is not in the tokenizer")
        return i

    @classmethod
    def from_folder(cls, folder: str | Path) -> JinjaChatTemplate:
        """Reads `tokenizer_config.json` (chat_template, bos/eos/pad names) and `tokenizer.json`."""
        folder = Path(folder)
        config_path, tok_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
        for p in (config_path, tok_path):
            if not p.is_file():
                raise FileNotFoundError(f"{str(p)!r} does not exist (needed for the chat template)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not isinstance(template, str):
            raise ValueError(f"{str(config_path)!r} has no (default) 'chat_template' string")

        def name(key):
            v = config.get(key)
            return v.get("content") if isinstance(v, dict) else v

        if name("bos_token") is None or name("eos_token") is None:
            raise ValueError(f"{str(config_path)!r} must name 'bos_token' and 'eos_token'")
        return cls(
            template,
            tokenizers.Tokenizer.from_file(str(tok_path)),
            bos_token=name("bos_token"),
            eos_token=name("eos_token"),
            pad_token=name("pad_token"),
            source=str(config_path),
        )

    def render_text(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.source}: the chat template failed: {e}") from e

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> Rendered:
        messages = validate_messages(list(messages), "messages")
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render_text(messages[:i], add_generation_prompt=True)
            upto = self.render_text(messages[: i + 1])
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise ValueError(
                    f"{self.source}: cannot locate assistant message {i}: the template's render "
                    "of a conversation prefix is not a prefix of the whole conversation"
                )
            spans.append((len(prefix), len(upto)))
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        starts = np.asarray([s for s, _ in enc.offsets], np.int64)
        mask = np.zeros(len(enc.ids), bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
        return Rendered(np.asarray(enc.ids, np.int32), mask)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# ---- records ------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yields (`file:line`, record) for each non-blank line; a bad line is a ChatDataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ChatDataError(f"{where}: a record must be a JSON object")
            yield where, record


def _field(record: dict, key: str, where: str, kind=str):
    if key not in record:
        raise ChatDataError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    if not isinstance(record[key], kind):
        raise ChatDataError(f"{where}: field {key!r} must be a {kind.__name__}")
    return record[key]


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The `prompt` field as messages (a string is one user message)."""
    if "prompt" not in record:
        raise ChatDataError(f"{where}: missing field 'prompt' (fields: {sorted(record)})")
    p = record["prompt"]
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    return validate_messages(p, where)


def to_pairs(rendered: Rendered) -> dict[str, np.ndarray]:
    """Next-token pairs of one rendered conversation: input_ids, labels, loss_mask [n-1]."""
    ids, mask = rendered
    return {
        "input_ids": ids[:-1],
        "labels": ids[1:],
        "loss_mask": mask[1:].astype(np.int32),
    }


def _check_length(pairs, seq_len: int, where: str):
    n = len(pairs["input_ids"])
    if n > seq_len:
        raise ChatDataError(f"{where}: {n + 1} tokens do not fit seq_len={seq_len} (+1 label)")
    if not pairs["loss_mask"].any():
        raise ChatDataError(f"{where}: no assistant token to learn from")


def load_sft(path: str | Path, template: ChatTemplate, *, seq_len: int) -> list[dict]:
    """SFT examples (next-token pairs with the response-only loss mask) of a messages JSONL."""
    examples = []
    for where, record in read_jsonl(path):
        messages = validate_messages(_field(record, "messages", where, list), where)
        pairs = to_pairs(template.render(messages))
        _check_length(pairs, seq_len, where)
        examples.append(pairs)
    if not examples:
        raise ChatDataError(f"chat data file {str(path)!r} has no records")
    return examples


def pack_examples(examples: Sequence[dict], *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Packs examples first-fit, in order, into rows of seq_len positions.

    Returns:
      int32 [N, T] `input_ids`, `labels`, `loss_mask`, `segment_ids` (1, 2, ... per example, 0 on
      padding) and `positions` (restarting at 0 per example); padding has loss_mask 0.
    """
    rows: list[list[dict]] = []
    free: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        if n > seq_len:
            raise ValueError(f"an example of {n} positions does not fit seq_len={seq_len}")
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(ex)
                free[r] -= n
                break
        else:
            rows.append([ex])
            free.append(seq_len - n)
    N = len(rows)
    out = {k: np.zeros((N, seq_len), np.int32) for k in (*PAIR_FEATURES, "segment_ids")}
    out["positions"] = np.zeros((N, seq_len), np.int32)
    out["input_ids"][:] = pad_id
    out["labels"][:] = pad_id
    for r, row in enumerate(rows):
        s = 0
        for seg, ex in enumerate(row, 1):
            n = len(ex["input_ids"])
            for k in PAIR_FEATURES:
                out[k][r, s : s + n] = ex[k]
            out["segment_ids"][r, s : s + n] = seg
            out["positions"][r, s : s + n] = np.arange(n)
            s += n
    return out


def _pad_rows(examples: Sequence[dict], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, right-padded; segment_ids 1 on real positions."""
    N = len(examples)
    out = {k: np.zeros((N, seq_len), np.int32) for k in (*PAIR_FEATURES, "segment_ids")}
    out["input_ids"][:] = pad_id
    out["labels"][:] = pad_id
    for r, ex in enumerate(examples):
        n = len(ex["input_ids"])
        for k in PAIR_FEATURES:
            out[k][r, :n] = ex[k]
        out["segment_ids"][r, :n] = 1
    return out


def load_dpo(path: str | Path, template: ChatTemplate, *, seq_len: int) -> dict[str, np.ndarray]:
    """Preference pairs as int32 [N, T] arrays `chosen_*` and `rejected_*` (PAIR_FEATURES and
    segment_ids), one pair per row, right-padded with the template's pad id."""
    chosen, rejected = [], []
    for where, record in read_jsonl(path):
        prompt = prompt_messages(record, where)
        for key, out in (("chosen", chosen), ("rejected", rejected)):
            reply = _field(record, key, where)
            pairs = to_pairs(template.render(prompt + [{"role": "assistant", "content": reply}]))
            _check_length(pairs, seq_len, f"{where} ({key})")
            out.append(pairs)
    if not chosen:
        raise ChatDataError(f"chat data file {str(path)!r} has no records")
    batch = {}
    for prefix, examples in (("chosen_", chosen), ("rejected_", rejected)):
        for k, v in _pad_rows(examples, seq_len, template.pad_id).items():
            batch[prefix + k] = v
    return batch


def load_prompts(path: str | Path, template: ChatTemplate) -> list[dict]:
    """GRPO prompts: each record with `prompt_ids` (rendered with the generation prompt) added.

    Every record needs `prompt` and `answer` (a string); other fields are kept for rewards.
    """
    out = []
    for where, record in read_jsonl(path):
        messages = prompt_messages(record, where)
        _field(record, "answer", where)
        ids = template.render(messages, add_generation_prompt=True).ids
        out.append({**record, "prompt_ids": ids.tolist(), "where": where})
    if not out:
        raise ChatDataError(f"chat data file {str(path)!r} has no records")
    return out
