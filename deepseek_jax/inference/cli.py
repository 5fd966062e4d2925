"""`python -m deepseek_jax.generate`: sample from a hub folder, our Orbax checkpoint or a run.

    python -m deepseek_jax.generate --checkpoint runs/v3-small --prompt "Once upon a time"
    python -m deepseek_jax.generate --checkpoint ~/DeepSeek-V2-Lite-Chat --chat --prompt "Hi" \
        --max-new-tokens 64 --temperature 0.7 --top-p 0.95 --stream

`--checkpoint` accepts
  * a training run folder (it holds `config.yaml`, written by `train_main.py`): the newest
    checkpoint under the run's checkpoint dir and the run's tokenizer (`data.tokenizer`, or
    UTF-8 bytes when the run trained on bytes);
  * a hub checkpoint folder (config.json + safetensors) with its `tokenizer.json`;
  * an Orbax checkpoint written by `python -m deepseek_jax.convert hf-to-orbax` (a
    `tokenizer.json` beside it is used when present).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax.numpy as jnp

from deepseek_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from deepseek_jax.inference.engine import generate_stream
from deepseek_jax.inference.text import read_chat_template, render_chat


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.yaml").is_file()


def load_run(run_dir: str | os.PathLike):
    """(model, tokenizer, step) from the newest checkpoint of a `train_main.py` run folder."""
    from flax import nnx

    from deepseek_jax.data import load_tokenizer
    from deepseek_jax.train.checkpoint import Checkpointer
    from deepseek_jax.train.config import load_run_config
    from deepseek_jax.train.step import abstract_train_state

    run_dir = Path(run_dir)
    cfg = load_run_config(str(run_dir / "config.yaml"))
    ckpt_dir = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"run {str(run_dir)!r}: no checkpoint folder {ckpt_dir!r}")
    graphdef, abstract = abstract_train_state(cfg.model, cfg.train, seed=cfg.train.seed)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint)
    try:
        restored = ckpt.restore(abstract._asdict())
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"run {str(run_dir)!r}: {ckpt_dir!r} holds no checkpoint")
    step, state, _ = restored
    model = nnx.merge(graphdef, state["params"], state["biases"], state["other"])
    tok_path = cfg.data.tokenizer
    if tok_path is not None and not os.path.isfile(tok_path):
        raise FileNotFoundError(
            f"run {str(run_dir)!r} trained with tokenizer {tok_path!r}, which does not exist "
            "(relative paths are read from the current directory: run from the repo root)"
        )
    return model, load_tokenizer(tok_path), step


def load_for_generation(path: str | os.PathLike, dtype=jnp.float32):
    """(model, tokenizer or None, folder of tokenizer_config.json or None) for `path`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is not a folder")
    if is_run_dir(path):
        model, tokenizer, _ = load_run(path)
        return model, tokenizer, None
    from deepseek_jax.pretrained import load_pretrained

    model = load_pretrained(str(path), dtype=dtype)
    tokenizer = (
        HFTokenizer(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    )
    return model, tokenizer, path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_jax.generate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="run folder, hub folder or Orbax folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are decided")
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    p.add_argument("--bos", action="store_true", help="start each prompt with the bos token")
    p.add_argument("--cache-dtype", default=None, help="float32 | bfloat16 | int8 | float8_e4m3fn")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--draft", default=None, choices=["mtp"], help="speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, default=1, help="tokens drafted per step")
    return p


def encode_prompts(texts, tokenizer: Tokenizer, *, chat_dir=None, bos=False) -> list[list[int]]:
    if chat_dir is not None:
        info = read_chat_template(chat_dir)
        variables = {k: v for k, v in info.items() if k != "template"}
        texts = [
            render_chat(info["template"], [{"role": "user", "content": t}], **variables)
            for t in texts
        ]
        # The rendered text spells the special tokens: let the tokenizer recognise them.
        tok = getattr(tokenizer, "_tok", None)
        if tok is not None:
            tok.encode_special_tokens = False
            return [tok.encode(t, add_special_tokens=False).ids for t in texts]
    prefix = [tokenizer.bos_id] if bos else []
    return [prefix + tokenizer.encode(t) for t in texts]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model, tokenizer, folder = load_for_generation(args.checkpoint, jnp.dtype(args.dtype))
    if tokenizer is None:
        raise SystemExit(f"{args.checkpoint}: no tokenizer.json next to the checkpoint")
    if args.chat and folder is None:
        raise SystemExit("--chat needs a hub folder with tokenizer_config.json's chat_template")
    prompts = encode_prompts(
        args.prompt, tokenizer, chat_dir=folder if args.chat else None, bos=args.bos
    )
    stop_ids = [tokenizer.eos_id] if not isinstance(tokenizer, ByteTokenizer) else []
    stats: dict = {}
    chunks = generate_stream(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_ids,
        stop_strings=args.stop,
        tokenizer=tokenizer,
        cache_dtype=args.cache_dtype,
        chunk_size=4 if args.stream else None,
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        stats=stats,
    )
    outputs = [[] for _ in prompts]
    for chunk in chunks:
        if args.stream and len(prompts) == 1:
            before = tokenizer.decode(outputs[0])
            outputs[0] += chunk.tokens
            print(tokenizer.decode(outputs[0])[len(before) :], end="", flush=True)
        else:
            outputs[chunk.index] += chunk.tokens
    if args.stream and len(prompts) == 1:
        print()
    else:
        for text, toks in zip(args.prompt, outputs, strict=True):
            print(f"{text}{tokenizer.decode(toks)}")
    print(
        f"[{stats['generated_tokens']} tokens, prefill {stats['prefill_s']:.2f}s, decode "
        f"{stats['decode_tokens_per_s']:.1f} tok/s, {stats['compilations']} compilations]",
        file=sys.stderr,
    )
    if "speculative" in stats:
        sp = stats["speculative"]
        per_pos = ", ".join(f"{r:.2f}" for r in sp["acceptance_per_position"])
        print(
            f"[draft mtp k={sp['num_draft_tokens']}: acceptance per position [{per_pos}], "
            f"mean accepted length {sp['mean_accepted_length']:.2f} tokens/step, "
            f"{sp['drafted_tokens']} drafted, {sp['accepted_tokens']} accepted, "
            f"{stats['generated_tokens']} emitted]",
            file=sys.stderr,
        )
    return 0
