"""The generation engine: ragged prefill and a jitted decode loop over the latent cache.

One call of `generate` runs two compiled programs:
  * prefill - the right-padded prompts [B, T] through `DeepSeekModel.decode` at positions
    0..T-1 of each row (ragged rows in one call: a padded token writes a slot beyond its row's
    length that the row's next real token overwrites before any query attends it), then the
    logits at each row's last prompt token;
  * decode  - a `lax.while_loop` that samples one token per row, records it with its raw
    log-probability, checks stop ids and lengths, and feeds the token back at the row's own
    position; it exits early once every row is finished (no Python round trip per token).
    A finished row feeds nothing to the cache (its slot is out of range, the write is dropped).

Shapes are bucketed (batch, prompt length, cache length and output width rounded up to powers of
two) so that prompts of different lengths and sampling parameters of different values reuse the
same programs; `stats["compilations"]` counts the programs traced by a call.

The loop body is `_step`; with `draft="mtp"` the programs of inference/speculative.py replace
both (draft k tokens with the MTP modules, verify them in one forward, write up to k + 1 tokens
per row per iteration) and the loop counts verify steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.inference import speculative
from deepseek_jax.inference.sampling import sample
from deepseek_jax.mla import QUANTIZED_CACHE_DTYPES, LatentCache
from deepseek_jax.sharding.logical import activation_spec

FINISH_REASONS = ("", "stop", "length")  # codes 0 (running), 1, 2 of the loop's `reason`
# Logical axes of a stacked latent cache: [L, B, S, C], [L, B, S, R] and the scales [L, B, S].
CACHE_AXES = LatentCache(
    ("layers", "batch", "cache_seq", "kv_lora"),
    ("layers", "batch", "cache_seq", None),
    ("layers", "batch", "cache_seq"),
    ("layers", "batch", "cache_seq"),
)
_MIN_PROMPT_BUCKET = 8
_MIN_OUT_BUCKET = 8
_TRACES = {"count": 0}  # incremented while tracing, i.e. once per compiled program


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Per prompt, in order: new tokens, their raw log-probs and why generation stopped.

    Attributes:
      tokens: new token ids only (a stop token is included when one ended the row).
      logprobs: log p(token) under the model, before temperature / top-k / top-p.
      finish_reasons: "stop" (a stop id or string) or "length" (max_new_tokens reached).
      stats: timings, token counts, buckets and `compilations` (programs traced by this call).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """New tokens of one row, as `generate_stream` decides them."""

    index: int  # the prompt's position in `prompts`
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None  # set on the row's last chunk


class Sampling(NamedTuple):
    """Per-row sampling parameters as arrays (values never trigger a recompilation)."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] i32, 0 = off
    top_p: jax.Array  # [B] f32 in (0, 1]
    stop_ids: jax.Array  # [B, K] i32, -1 = none
    max_new: jax.Array  # [B] i32
    keys: jax.Array  # [B] typed PRNG keys, one stream per row


class DecodeState(NamedTuple):
    """The decode loop's carry."""

    caches: list[LatentCache]
    next_logits: jax.Array  # [B, V] fp32 logits for each row's next token
    tokens: jax.Array  # [B, M] i32 new tokens
    logprobs: jax.Array  # [B, M] f32 their raw log-probs
    count: jax.Array  # [B] i32 tokens generated per row
    done: jax.Array  # [B] bool
    reason: jax.Array  # [B] i32 index into FINISH_REASONS
    step: jax.Array  # [] i32 loop iterations so far


# ---- bucketing and validation ---------------------------------------------------------------
def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << max(0, (max(n, minimum) - 1).bit_length())


def _per_prompt(name: str, value, n: int, cast) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts; give one or {n}")
        return [cast(v) for v in value]
    return [cast(value)] * n


def _stop_lists(stop_token_ids, n: int) -> list[tuple[int, ...]]:
    """() or a flat list of ids (every row) or one list per prompt."""
    ids = list(stop_token_ids)
    if ids and all(isinstance(s, (list, tuple)) for s in ids):
        if len(ids) != n:
            raise ValueError(f"stop_token_ids has {len(ids)} lists for {n} prompts")
        return [tuple(int(t) for t in s) for s in ids]
    return [tuple(int(t) for t in ids)] * n


def _check_prompts(prompts, vocab: int, max_new: int, limit: int, limit_name: str):
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompts[{i}] must be a flat list of integer token ids")
        if ids.size == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            j = int(bad[0])
            raise ValueError(
                f"prompts[{i}][{j}] = {int(ids[j])} is not a token id of the model's "
                f"vocabulary [0, {vocab})"
            )
        if ids.size + max_new > limit:
            raise ValueError(
                f"prompts[{i}] has {ids.size} tokens; with max_new_tokens={max_new} it needs "
                f"{ids.size + max_new} positions, more than {limit_name}={limit}"
            )
        out.append(ids.astype(np.int32))
    return out


def _sampling_arrays(n, bp, temperature, top_k, top_p, stop_token_ids, max_new, seed, vocab):
    temps = _per_prompt("temperature", temperature, n, float)
    ks = _per_prompt("top_k", top_k, n, int)
    ps = _per_prompt("top_p", top_p, n, float)
    for i in range(n):
        where = f"[{i}]" if n > 1 or isinstance(temperature, (list, tuple)) else ""
        if not temps[i] >= 0:
            raise ValueError(f"temperature{where}={temps[i]} must be >= 0 (0 = greedy)")
        if not 0 < ps[i] <= 1:
            raise ValueError(f"top_p{where}={ps[i]} must be in (0, 1]")
        if ks[i] < 0:
            raise ValueError(f"top_k{where}={ks[i]} must be >= 0 (0 = off)")
    stops = _stop_lists(stop_token_ids, n)
    for i, s in enumerate(stops):
        for t in s:
            if not 0 <= t < vocab:
                raise ValueError(f"stop_token_ids for prompts[{i}]: {t} is outside [0, {vocab})")
    K = max(1, max(len(s) for s in stops))
    stop = np.full((bp, K), -1, np.int32)
    for i, s in enumerate(stops):
        stop[i, : len(s)] = s
    pad = bp - n
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(bp))
    return Sampling(
        jnp.asarray(temps + [0.0] * pad, jnp.float32),
        jnp.asarray(ks + [0] * pad, jnp.int32),
        jnp.asarray(ps + [1.0] * pad, jnp.float32),
        jnp.asarray(stop),
        jnp.asarray([max_new] * n + [1] * pad, jnp.int32),
        keys,
    )


# ---- the compiled programs --------------------------------------------------------------------
def _constrain_caches(caches, mesh: Mesh | None, rules):
    if mesh is None:
        return caches
    rules = dict(rules or ())

    def one(cache: LatentCache) -> LatentCache:
        return LatentCache(
            *(
                None
                if a is None
                else jax.lax.with_sharding_constraint(
                    a, NamedSharding(mesh, activation_spec(axes, rules))
                )
                for a, axes in zip(cache, CACHE_AXES, strict=True)
            )
        )

    return [one(c) for c in caches]


_PREFILL_STATIC = ("graphdef", "max_len", "out_len", "cache_dtype", "mesh", "rules")


@partial(jax.jit, static_argnames=_PREFILL_STATIC)
def _prefill(graphdef, state, ids, lens, *, max_len, out_len, cache_dtype, mesh, rules):
    """ids [B, T] right-padded, lens [B] -> the DecodeState before the first sampled token."""
    _TRACES["count"] += 1
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    caches = _constrain_caches(model.init_cache(B, max_len, jnp.dtype(cache_dtype)), mesh, rules)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, caches = model.decode(ids, caches, positions)  # [B, T, V]
    last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    return DecodeState(
        caches=_constrain_caches(caches, mesh, rules),
        next_logits=last,
        tokens=jnp.zeros((B, out_len), jnp.int32),
        logprobs=jnp.zeros((B, out_len), jnp.float32),
        count=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        reason=jnp.zeros((B,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def _step(model, c: DecodeState, lens, sp: Sampling, mesh, rules) -> DecodeState:
    """One loop iteration: sample a token per running row, record it, feed it to the cache."""
    S = c.caches[0].c_kv.shape[2]
    keys = jax.vmap(jax.random.fold_in)(sp.keys, jnp.broadcast_to(c.step, sp.keys.shape))
    tok, lp = sample(c.next_logits, keys, sp.temperature, sp.top_k, sp.top_p)  # [B], [B]
    active = ~c.done
    col = jnp.minimum(c.count, c.tokens.shape[1] - 1)[:, None]  # [B, 1] the row's next slot
    rows = jnp.arange(tok.shape[0])[:, None]
    tokens = c.tokens.at[rows, col].set(jnp.where(active, tok, c.tokens[rows, col][:, 0])[:, None])
    logprobs = c.logprobs.at[rows, col].set(
        jnp.where(active, lp, c.logprobs[rows, col][:, 0])[:, None]
    )
    count = c.count + active
    hit_stop = active & jnp.any(tok[:, None] == sp.stop_ids, axis=-1)
    hit_len = active & ~hit_stop & (count >= sp.max_new)
    reason = jnp.where(hit_stop, 1, jnp.where(hit_len, 2, c.reason))
    done = c.done | hit_stop | hit_len
    # A finished row writes nowhere: slot S is out of range and the scatter drops it.
    positions = jnp.where(done, S, lens + count - 1)[:, None]  # [B, 1]

    def forward(_):
        logits, caches = model.decode(tok[:, None], c.caches, positions)
        return logits[:, 0], _constrain_caches(caches, mesh, rules)

    next_logits, caches = jax.lax.cond(
        jnp.all(done), lambda _: (c.next_logits, c.caches), forward, None
    )
    return DecodeState(caches, next_logits, tokens, logprobs, count, done, reason, c.step + 1)


@partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"), donate_argnames=("carry",))
def _decode(graphdef, state, carry: DecodeState, lens, sp: Sampling, until, *, mesh, rules):
    """Runs `_step` until step == `until` or every row is done (a lax.while_loop)."""
    _TRACES["count"] += 1
    model = nnx.merge(graphdef, state)
    return jax.lax.while_loop(
        lambda c: (c.step < until) & ~jnp.all(c.done),
        lambda c: _step(model, c, lens, sp, mesh, rules),
        carry,
    )


# ---- the public API ---------------------------------------------------------------------------
def _resolve_cache_dtype(cache_dtype, model) -> str:
    if cache_dtype is None:
        return jnp.dtype(model.cfg.compute_dtype).name
    dt = jnp.dtype(cache_dtype)
    allowed = {"float32", "bfloat16", "float16"} | {d.name for d in QUANTIZED_CACHE_DTYPES}
    if dt.name not in allowed:
        raise ValueError(f"cache_dtype={dt.name!r}: allowed {sorted(allowed)}")
    return dt.name


def generate_stream(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    seed: int = 0,
    draft: str | None = None,
    num_draft_tokens: int = 1,
    max_len: int | None = None,
    cache_dtype=None,
    chunk_size: int | None = 8,
    mesh: Mesh | None = None,
    rules: dict | None = None,
    stats: dict | None = None,
) -> Iterator[StreamChunk]:
    """Like `generate`, but yields each row's new tokens every `chunk_size` decode steps.

    Concatenating a row's chunks gives exactly `generate`'s tokens and log-probs for the same
    arguments (the same programs and random streams run; stop strings are checked between
    chunks). `chunk_size=None` decodes everything in one device call; with draft="mtp" a chunk
    is `chunk_size` verify steps (up to num_draft_tokens + 1 tokens per row each). `stats`, when
    given, is filled with the run's statistics.
    """
    cfg = model.cfg
    if draft not in (None, "mtp"):
        raise ValueError(f"draft={draft!r}: allowed None or 'mtp'")
    if draft is None and num_draft_tokens != 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} needs draft='mtp'; use 1")
    if draft == "mtp":
        if cfg.num_nextn_predict_layers < 1 or cfg.attention_type != "mla":
            raise ValueError(
                "draft='mtp' needs MTP modules (num_nextn_predict_layers >= 1) and MLA; the "
                f"model has num_nextn_predict_layers={cfg.num_nextn_predict_layers}, "
                f"attention_type={cfg.attention_type!r}"
            )
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be a positive integer")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive integer or None")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer= to decode the generated tokens")
    limit, limit_name = cfg.max_position_embeddings, "max_position_embeddings"
    if max_len is not None and max_len < limit:
        limit, limit_name = max_len, "max_len (the cache length)"
    rows = _check_prompts(prompts, cfg.vocab_size, max_new_tokens, limit, limit_name)
    n = len(rows)
    data = 1
    if mesh is not None:
        batch_axes = activation_spec(("batch",), rules or {})[0]
        batch_axes = () if batch_axes is None else np.atleast_1d(batch_axes)
        data = int(np.prod([mesh.shape[a] for a in batch_axes]))
    bp = -(-bucket(n) // data) * data
    lens = [len(r) for r in rows]
    tp = bucket(max(lens), _MIN_PROMPT_BUCKET)
    S = max_len if max_len is not None else bucket(max(lens) + max_new_tokens)
    out_len = bucket(max_new_tokens, _MIN_OUT_BUCKET)
    sp = _sampling_arrays(
        n, bp, temperature, top_k, top_p, stop_token_ids, max_new_tokens, seed, cfg.vocab_size
    )
    ids = np.zeros((bp, tp), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    ids[n:, 0] = 0  # padded rows: a one-token dummy prompt, finished before the first step
    lens_arr = jnp.asarray(lens + [1] * (bp - n), jnp.int32)
    graphdef, state = nnx.split(model)
    rules_key = None if rules is None else tuple(sorted(rules.items()))
    static = dict(mesh=mesh, rules=rules_key)

    traces0 = _TRACES["count"]
    t0 = time.perf_counter()
    prefill_args = dict(
        max_len=S,
        out_len=out_len,
        cache_dtype=_resolve_cache_dtype(cache_dtype, model),
        mesh=mesh,
        rules=rules_key,
    )
    if draft == "mtp":
        decode = speculative.spec_decode
        carry = speculative.spec_prefill(
            graphdef, state, jnp.asarray(ids), lens_arr, sp, K=num_draft_tokens, **prefill_args
        )
    else:
        decode = _decode
        carry = _prefill(graphdef, state, jnp.asarray(ids), lens_arr, **prefill_args)
    if bp > n:
        carry = carry._replace(done=carry.done.at[n:].set(True))
    jax.block_until_ready(carry.count)
    t1 = time.perf_counter()

    sent = [0] * n  # tokens already yielded per row
    final = [None] * n  # host-decided (stop string) ends: (count, reason)
    step = 0
    while True:
        until = max_new_tokens if chunk_size is None else min(step + chunk_size, max_new_tokens)
        carry = decode(graphdef, state, carry, lens_arr, sp, jnp.int32(until), **static)
        step = until
        count, done, reason, toks, lps = jax.device_get(
            (carry.count, carry.done, carry.reason, carry.tokens, carry.logprobs)
        )
        newly_done = []
        for i in range(n):
            if final[i] is not None:
                continue
            c = int(count[i])
            if stop_strings and c > sent[i]:
                cut = _stop_string_cut(tokenizer, toks[i, :c].tolist(), stop_strings, sent[i])
                if cut is not None:
                    final[i] = (cut, "stop")
                    newly_done.append(i)
            if final[i] is None and done[i]:
                final[i] = (c, FINISH_REASONS[int(reason[i])])
            end = c if final[i] is None else final[i][0]
            if end > sent[i] or final[i] is not None:
                yield StreamChunk(
                    i,
                    toks[i, sent[i] : end].tolist(),
                    lps[i, sent[i] : end].tolist(),
                    None if final[i] is None else final[i][1],
                )
                sent[i] = end
        if newly_done:
            carry = carry._replace(done=carry.done.at[jnp.asarray(newly_done)].set(True))
        if all(f is not None for f in final) or step >= max_new_tokens:
            break
    t2 = time.perf_counter()
    if stats is not None:
        generated = sum(f[0] for f in final)
        stats.update(
            prompts=n,
            prompt_tokens=sum(lens),
            generated_tokens=generated,
            decode_steps=int(jax.device_get(carry.step)),
            compilations=_TRACES["count"] - traces0,
            buckets=dict(batch=bp, prompt_len=tp, cache_len=S, out_len=out_len),
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            prefill_tokens_per_s=sum(lens) / max(t1 - t0, 1e-9),
            decode_tokens_per_s=generated / max(t2 - t1, 1e-9),
            cache_dtype=_resolve_cache_dtype(cache_dtype, model),
        )
        if draft == "mtp":
            stats["speculative"] = speculative.spec_stats(carry)


def _stop_string_cut(tokenizer, toks: list[int], stop_strings, checked: int) -> int | None:
    """The fewest tokens whose text contains a stop string (None if none does yet)."""
    if not any(s in tokenizer.decode(toks) for s in stop_strings):
        return None
    for k in range(max(1, checked), len(toks) + 1):
        text = tokenizer.decode(toks[:k])
        if any(s in text for s in stop_strings):
            return k
    return len(toks)


def generate(model, prompts: Sequence[Sequence[int]], **kwargs) -> GenerationResult:
    """Generates continuations of a ragged batch of prompts with the latent cache.

    Args:
      model: a DeepSeekModel.
      prompts: token-id lists of any lengths (>= 1 token each).
      max_new_tokens: new tokens per prompt at most.
      temperature, top_k, top_p: a value for every prompt or one per prompt; temperature 0 is
        greedy, top_k 0 keeps every token, top_p in (0, 1].
      stop_token_ids: ids that end a row (kept as its last token); one list per prompt allowed.
      stop_strings: strings that end a row once its decoded text contains one (needs
        `tokenizer`, any object with `decode(ids) -> str`).
      seed: the random stream of row i is fold_in(key(seed), i), stepped by fold_in(., step).
      draft, num_draft_tokens: "mtp" drafts num_draft_tokens tokens per step with the MTP
        modules (the last one reused for depths beyond num_nextn_predict_layers) and verifies
        them in one forward (inference/speculative.py): greedy output is identical to
        draft=None and sampled output has the same distribution; stats["speculative"] holds
        the acceptance per draft position, mean accepted length (tokens per verify step),
        drafted and accepted tokens.
      max_len: cache slots (default: the bucketed need of this call).
      cache_dtype: the latent cache's dtype; int8 or float8_e4m3fn stores 8 bits per value with
        a per-token scale.
      mesh, rules: a device mesh and logical-axis rules; the cache and batch split over `batch`.
    Returns:
      GenerationResult.
    Raises:
      ValueError: naming the prompt and the limit for empty or too-long prompts, ids outside
        the vocabulary, or sampling parameters out of range.
    """
    kwargs.setdefault("chunk_size", 8 if kwargs.get("stop_strings") else None)
    stats: dict[str, Any] = {}
    n = len(prompts) if isinstance(prompts, Sequence) else 0
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons = [""] * n
    for chunk in generate_stream(model, prompts, stats=stats, **kwargs):
        tokens[chunk.index] += chunk.tokens
        logprobs[chunk.index] += chunk.logprobs
        if chunk.finish_reason is not None:
            reasons[chunk.index] = chunk.finish_reason
    return GenerationResult(tokens, logprobs, reasons, stats)
