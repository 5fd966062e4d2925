"""Lossless speculative decoding with the MTP modules as the draft model.

Notation for one row: L tokens t_0..t_{L-1} are known (prompt + emitted); the main model has
processed positions 0..L-2 and t_{L-1} (the last emitted token) is pending. One step:
  1. verify - the main model runs [t_{L-1}, d_1..d_K] at positions L-1..L+K-1 in ONE forward over
     its latent cache; logits at L-1+i give the target distribution p_i of t_{L+i}.
  2. accept - (Leviathan et al. 2023, Chen et al. 2023) draft d_i ~ q_i is accepted with
     probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
     normalize(max(p_i - q_i, 0)), and when all K are accepted a bonus token from p_K. Emitted
     tokens have exactly the target's distribution; with temperature 0 both p and q are one-hot
     at their argmax, which makes the output identical to greedy decoding.
  3. draft - MTP module k (V3 eq. 21-23) at position j combines h^{k-1}_j with Emb(t_{j+k}) and
     predicts t_{j+k+1}. Module k's entries are exact ("real") for j <= L-1-k; each step module
     k runs one window of positions from its first non-real position (L-k before the step) to
     the draft position L'-2 (L' = L after the step), using draft tokens where t_{j+k} is not
     known yet, so its own latent cache stays what training would have computed for the
     accepted tokens. Module k at L'-2 proposes d_k. Depths k > D (the number of modules) reuse
     the last module one position further on (h^D_{L'-2} stands for h^{D-1}_{L'-1}).
Rejected or padded positions are never copied away: they are overwritten by index later
(decode_cache.py's write-then-attend contract), and a finished row writes nowhere (slot S).

Draft distributions q use the row's own temperature / top-k / top-p, so the same accept rule
serves greedy and sampled rows of one batch.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.decode_cache import write_slots
from deepseek_jax.inference.sampling import filtered_logits, sample


class SpecState(NamedTuple):
    """The speculative loop's carry (shares `count`..`step` with engine.DecodeState)."""

    caches: list  # the main model's stacked latent caches
    mtp_caches: list  # one cache per MTP module
    hid: list  # [B, S, D] h^k of module k for k = 1..min(K, D)-1 (module k+1's input)
    seq: jax.Array  # [B, S + K] i32 known and draft tokens at their positions
    draft_tokens: jax.Array  # [B, K] i32 d_1..d_K for the next verify
    draft_probs: jax.Array  # [B, K, V] f32 the q they were drawn from
    tokens: jax.Array  # [B, M] i32 new tokens
    logprobs: jax.Array  # [B, M] f32 their raw log-probs
    count: jax.Array  # [B] i32
    done: jax.Array  # [B] bool
    reason: jax.Array  # [B] i32 index into engine.FINISH_REASONS
    step: jax.Array  # [] i32 verify steps so far
    reached: jax.Array  # [K] i32 row-steps that verified draft position i (d_1..d_i-1 taken)
    accepted: jax.Array  # [K] i32 row-steps that accepted draft position i
    row_steps: jax.Array  # [] i32 verify steps summed over running rows
    advanced: jax.Array  # [] i32 sum of (accepted + 1) over those row-steps


# ---- the accept / resample kernel -------------------------------------------------------------
def token_probs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """The sampling distribution per row after temperature / top-k / top-p, in vocab order.

    Args:
      logits: [B, T, V] raw logits; temperature, top_k, top_p: [B] (see sampling.py).
    Returns:
      [B, T, V] probabilities; rows with temperature 0 are one-hot at the argmax of the raw
      logits (the greedy choice of `sampling.sample`).
    """
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    rep = lambda a: jnp.repeat(a, T)  # noqa: E731  [B] -> [B * T]
    greedy = jax.nn.one_hot(jnp.argmax(flat, axis=-1), V, dtype=flat.dtype)

    def filtered(_):
        order, kept = filtered_logits(flat, rep(temperature), rep(top_k), rep(top_p))
        rows = jnp.arange(B * T)[:, None]
        probs = jnp.zeros_like(flat).at[rows, order].set(jax.nn.softmax(kept, axis=-1))
        return jnp.where(rep(temperature)[:, None] > 0, probs, greedy)

    # An all-greedy batch skips the sort over the vocabulary.
    probs = jax.lax.cond(jnp.any(temperature > 0), filtered, lambda _: greedy, None)
    return probs.reshape(B, T, V)


def speculative_accept(
    target_probs: jax.Array, draft_probs: jax.Array, draft_tokens: jax.Array, keys: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling's accept / resample rule, per row.

    Args:
      target_probs: [B, K+1, V] p_0..p_K, the target's distribution at each verified position;
      draft_probs: [B, K, V] q_1..q_K; draft_tokens: [B, K] d_i ~ q_i; keys: [B] PRNG keys.
    Returns:
      (accepted [B] i32 in 0..K: the length of the accepted prefix of the drafts,
       next_token [B] i32: drawn from normalize(max(p_a - q_a, 0)) after a rejection at a, or
       from p_K when all K were accepted).
    """
    B, K = draft_tokens.shape
    k_u, k_r = jnp.unstack(jax.vmap(lambda k: jax.random.split(k))(keys), axis=1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(k_u)  # [B, K] in [0, 1)
    d = draft_tokens[..., None]
    p_d = jnp.take_along_axis(target_probs[:, :K], d, axis=-1)[..., 0]  # [B, K]
    q_d = jnp.take_along_axis(draft_probs, d, axis=-1)[..., 0]
    ok = u * q_d < p_d  # probability min(1, p/q)
    accepted = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1).astype(jnp.int32)  # [B]
    q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    at = accepted[:, None, None]
    p_a = jnp.take_along_axis(target_probs, at, axis=1)[:, 0]  # [B, V]
    q_a = jnp.take_along_axis(q_pad, at, axis=1)[:, 0]  # zeros after K accepts: the bonus is p_K
    resid = jnp.maximum(p_a - q_a, 0.0)
    dist = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p_a)
    nxt = jax.vmap(jax.random.categorical)(k_r, jnp.log(dist))
    return accepted, nxt.astype(jnp.int32)


# ---- drafting with the MTP modules ------------------------------------------------------------
def _keys(keys: jax.Array, step, tag: int) -> jax.Array:
    """Per-row keys of (step, tag): independent streams for uniforms, resampling and drafts."""
    fold = jax.vmap(jax.random.fold_in)
    keys = fold(keys, jnp.broadcast_to(step, keys.shape))
    return fold(keys, jnp.full(keys.shape, tag))


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a [B, N, ...] at idx [B, T] (clipped into range) -> [B, T, ...]."""
    idx = jnp.clip(idx, 0, a.shape[1] - 1)
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _draft(model, seq, hid, mtp_caches, h0, starts, sizes, last, done, sp, keys, K):
    """Runs the MTP chain and proposes d_1..d_K at the draft position `last` = L'-2.

    Args:
      seq: [B, S+K] tokens (t_{L'-1} already written); hid: module outputs (SpecState.hid);
      h0: [B, sizes[0], D] the main model's h^0 at module 1's window; starts: per depth <= D the
        window's first position [B]; sizes: the windows' lengths; last: [B]; done: [B] rows
        that write nowhere; sp: engine.Sampling; keys: [B] the step's draft keys.
    Returns:
      (draft tokens [B, K], draft probs [B, K, V], seq, hid, mtp_caches).
    """
    D = model.cfg.num_nextn_predict_layers
    S = mtp_caches[0][0].shape[1]
    rows = jnp.arange(seq.shape[0])
    hid, mtp_caches = list(hid), list(mtp_caches)
    tokens, probs = [], []
    h_last = None
    for k in range(1, K + 1):
        m = min(k, D) - 1
        if k <= D:
            pos = starts[k - 1][:, None] + jnp.arange(sizes[k - 1])  # [B, T] the window
            h_in = h0 if k == 1 else _take(hid[k - 2], pos)  # h^{k-1} [B, T, D]
            ids = _take(seq, pos + k)  # t_{j+k}
        else:  # recursion: the last module, one position further per extra depth
            pos = (last + k - D)[:, None]  # [B, 1]
            h_in, ids = h_last, _take(seq, pos + D)
        write = jnp.where((pos >= 0) & ~done[:, None], pos, S)  # slot S: dropped
        logits, h_out, mtp_caches[m] = model.mtp_decode(m, h_in, ids, write, mtp_caches[m])
        if k < min(K, D):
            hid[k - 1] = write_slots(hid[k - 1], h_out, write)
        at = (last[:, None] - pos[:, :1]) if k <= D else jnp.zeros_like(pos)  # [B, 1]
        lg, h_last = _take(logits, at), _take(h_out, at)  # [B, 1, V], [B, 1, D]
        q = token_probs(lg, sp.temperature, sp.top_k, sp.top_p)[:, 0]  # [B, V]
        d = jax.vmap(jax.random.categorical)(_keys(keys, 0, k), jnp.log(q)).astype(jnp.int32)
        seq = seq.at[rows, last + 1 + k].set(d, mode="drop")  # d_k is the guess of t_{L'-1+k}
        tokens.append(d)
        probs.append(q)
    return jnp.stack(tokens, 1), jnp.stack(probs, 1), seq, hid, mtp_caches


def _finish(count, done, reason, emitted, n_ok, sp):
    """Emitted tokens [B, T] of which the first n_ok [B] are valid -> how many to keep (cut
    after a stop id or at max_new), and the updated done / reason."""
    T = emitted.shape[1]
    idx = jnp.arange(T)[None, :]
    active = ~done
    is_stop = jnp.any(emitted[..., None] == sp.stop_ids[:, None, :], -1) & (idx < n_ok[:, None])
    first_stop = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1), T)
    n = jnp.minimum(jnp.minimum(n_ok, first_stop + 1), sp.max_new - count)
    n = jnp.where(active, n, 0)
    count = count + n
    hit_stop = active & (first_stop < n)
    hit_len = active & ~hit_stop & (count >= sp.max_new)
    reason = jnp.where(hit_stop, 1, jnp.where(hit_len, 2, reason))
    return n, count, done | hit_stop | hit_len, reason


def _record(buf, count, n, values):
    """Writes values [B, T] at columns count..count+n-1 of buf [B, M]."""
    idx = jnp.arange(values.shape[1])[None, :]
    cols = jnp.where(idx < n[:, None], count[:, None] + idx, buf.shape[1])
    return buf.at[jnp.arange(buf.shape[0])[:, None], cols].set(values, mode="drop")


_PREFILL_STATIC = ("graphdef", "max_len", "out_len", "cache_dtype", "K", "mesh", "rules")


@partial(jax.jit, static_argnames=_PREFILL_STATIC)
def spec_prefill(graphdef, state, ids, lens, sp, *, max_len, out_len, cache_dtype, K, mesh, rules):
    """Prompt prefill, the first token (the plain sampler's), the MTP caches and first drafts."""
    from deepseek_jax.inference import engine  # the shared cache constraint; avoids a cycle

    engine._TRACES["count"] += 1
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    B, T = ids.shape
    S, dt = max_len, jnp.dtype(cache_dtype)
    caches = engine._constrain_caches(model.init_cache(B, S, dt), mesh, rules)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h0, caches = model.decode_hidden(ids, caches, positions)  # [B, T, D]
    last_h = jnp.take_along_axis(h0, (lens - 1)[:, None, None], axis=1)
    logits = model.head(model.norm(last_h))[:, 0]  # [B, V]
    tok, lp = sample(logits, _step_key(sp.keys, 0), sp.temperature, sp.top_k, sp.top_p)
    zeros = jnp.zeros((B,), jnp.int32)
    done0 = sp.max_new <= 0  # padded rows are marked done by the caller
    n, count, done, reason = _finish(zeros, done0, zeros, tok[:, None], zeros + 1, sp)
    tokens = _record(jnp.zeros((B, out_len), jnp.int32), zeros, n, tok[:, None])
    logprobs = _record(jnp.zeros((B, out_len), jnp.float32), zeros, n, lp[:, None])
    seq = jnp.zeros((B, S + K), jnp.int32).at[:, :T].set(ids)
    seq = seq.at[jnp.arange(B), lens].set(tok)
    D = cfg.num_nextn_predict_layers
    mtp_caches = model.init_mtp_caches(B, S, dt)
    hid = [jnp.zeros((B, S, cfg.hidden_size), h0.dtype) for _ in range(min(K, D) - 1)]
    draft_tokens, draft_probs, seq, hid, mtp_caches = _draft(
        model, seq, hid, mtp_caches, h0, [zeros] * D, [T] * D, lens - 1, done, sp,
        _keys(sp.keys, 0, 1), K,
    )  # fmt: skip
    return SpecState(
        caches=engine._constrain_caches(caches, mesh, rules),
        mtp_caches=mtp_caches,
        hid=hid,
        seq=seq,
        draft_tokens=draft_tokens,
        draft_probs=draft_probs,
        tokens=tokens,
        logprobs=logprobs,
        count=count,
        done=done,
        reason=reason,
        step=jnp.zeros((), jnp.int32),
        reached=jnp.zeros((K,), jnp.int32),
        accepted=jnp.zeros((K,), jnp.int32),
        row_steps=jnp.zeros((), jnp.int32),
        advanced=jnp.zeros((), jnp.int32),
    )


def _step_key(keys, step):
    """The plain engine's key of a step (the first token matches plain sampling)."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape))


def _spec_step(model, c: SpecState, lens, sp, mesh, rules) -> SpecState:
    """Verify the drafts in one forward, accept, record, and draft again."""
    from deepseek_jax.inference import engine

    K = c.draft_tokens.shape[1]
    S = c.caches[0].c_kv.shape[2]
    active = ~c.done
    L0 = lens + c.count  # known tokens; t_{L0-1} is pending
    idx = jnp.arange(K + 1)[None, :]
    pos = L0[:, None] - 1 + idx  # [B, K+1]
    ids = _take(c.seq, pos)  # [t_{L0-1}, d_1..d_K]
    h0, caches = model.decode_hidden(ids, c.caches, jnp.where(c.done[:, None], S, pos))
    logits = model.head(model.norm(h0))  # [B, K+1, V]
    p = token_probs(logits, sp.temperature, sp.top_k, sp.top_p)
    step = c.step + 1
    a, y = speculative_accept(p, c.draft_probs, c.draft_tokens, _keys(sp.keys, step, 0))
    drafts = jnp.concatenate([c.draft_tokens, y[:, None]], axis=1)
    emitted = jnp.where(idx < a[:, None], drafts, y[:, None])  # [d_1..d_a, y, ...]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), emitted[..., None], -1)[..., 0]
    n, count, done, reason = _finish(c.count, c.done, c.reason, emitted, a + 1, sp)
    tokens = _record(c.tokens, c.count, n, emitted)
    logprobs = _record(c.logprobs, c.count, n, lp)
    rows = jnp.arange(lens.shape[0])[:, None]
    seq = c.seq.at[rows, jnp.where(idx <= a[:, None], L0[:, None] + idx, c.seq.shape[1])].set(
        emitted, mode="drop"
    )
    L1 = L0 + n
    D = model.cfg.num_nextn_predict_layers
    starts = [L0 - k for k in range(1, D + 1)]
    sizes = [K + k for k in range(1, D + 1)]
    draft_tokens, draft_probs, seq, hid, mtp_caches = _draft(
        model, seq, c.hid, c.mtp_caches, h0, starts, sizes, L1 - 2, done, sp,
        _keys(sp.keys, step, 1), K,
    )  # fmt: skip
    i = jnp.arange(K)[None, :]
    return SpecState(
        caches=engine._constrain_caches(caches, mesh, rules),
        mtp_caches=mtp_caches,
        hid=hid,
        seq=seq,
        draft_tokens=draft_tokens,
        draft_probs=draft_probs,
        tokens=tokens,
        logprobs=logprobs,
        count=count,
        done=done,
        reason=reason,
        step=step,
        reached=c.reached + jnp.sum(active[:, None] & (a[:, None] >= i), 0, dtype=jnp.int32),
        accepted=c.accepted + jnp.sum(active[:, None] & (a[:, None] > i), 0, dtype=jnp.int32),
        row_steps=c.row_steps + jnp.sum(active, dtype=jnp.int32),
        advanced=c.advanced + jnp.sum(jnp.where(active, a + 1, 0), dtype=jnp.int32),
    )


@partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"), donate_argnames=("carry",))
def spec_decode(graphdef, state, carry: SpecState, lens, sp, until, *, mesh, rules):
    """Runs `_spec_step` until step == `until` or every row is done (a lax.while_loop)."""
    from deepseek_jax.inference import engine

    engine._TRACES["count"] += 1
    model = nnx.merge(graphdef, state)
    return jax.lax.while_loop(
        lambda c: (c.step < until) & ~jnp.all(c.done),
        lambda c: _spec_step(model, c, lens, sp, mesh, rules),
        carry,
    )


def spec_stats(carry: SpecState) -> dict:
    """Acceptance figures of a finished run (host values)."""
    reached, accepted, row_steps, advanced = jax.device_get(
        (carry.reached, carry.accepted, carry.row_steps, carry.advanced)
    )
    K = len(reached)
    return dict(
        num_draft_tokens=K,
        verify_steps=int(row_steps),
        drafted_tokens=int(row_steps) * K,
        accepted_tokens=int(accepted.sum()),
        acceptance_per_position=[
            float(accepted[i]) / reached[i] if reached[i] else float("nan") for i in range(K)
        ],
        acceptance_rate=float(accepted.sum()) / max(int(row_steps) * K, 1),
        mean_accepted_length=float(advanced) / max(int(row_steps), 1),
    )
