"""Text around the engine: a checkpoint's tokenizer and its chat template.

A hub folder carries `tokenizer.json` (read through `tokenizers`, see data/tokenizer.py) and
`tokenizer_config.json`, whose `chat_template` is a Jinja2 template over `messages`; it is
rendered here the way transformers does (a sandboxed environment with `trim_blocks` and
`lstrip_blocks`, the special tokens as variables, `raise_exception` for the template's checks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_chat_template(directory: str | Path) -> dict[str, Any]:
    """The `chat_template` and special-token strings of `directory/tokenizer_config.json`.

    Raises:
      FileNotFoundError: the folder has no tokenizer_config.json.
      ValueError: the file has no `chat_template`.
    """
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: no chat template to apply")
    config = json.loads(path.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if not isinstance(template, str):
        raise ValueError(f"{str(path)!r} has no chat_template string")
    tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken dicts
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return {"template": template, **tokens}


def render_chat(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Renders a chat template.

    Args:
      template: the Jinja2 source (e.g. `read_chat_template(dir)["template"]`).
      messages: [{"role": "user" | "assistant" | "system", "content": str}, ...].
      add_generation_prompt: end with the assistant turn's opening.
      variables: bos_token, eos_token, ... available to the template.
    Returns:
      The prompt text (special tokens as text; encode it with special tokens recognised).
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
    )
