"""MTP speculative decoding: the accept/resample rule's statistics, greedy identity with plain
decoding, and the emitted distribution of generate(draft="mtp") against the exact target.

Models: v3-tiny with 1 or 2 MTP modules. Their MTP modules are made to nearly copy the main
model's prediction (h^k ~ h^{k-1}: drafts guess "the same token again"), so that drafts are
sometimes accepted and sometimes rejected; a random MTP module is almost never right, which would
leave the accept path untested. All calls share buckets (batch 4, prompts <= 16, max_len 32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from deepseek_jax.config import load_preset
from deepseek_jax.inference.engine import generate
from deepseek_jax.inference.sampling import filtered_logits
from deepseek_jax.inference.speculative import speculative_accept, token_probs
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.testing import MODEL_FP32, assert_close

MAX_LEN = 32
PROMPTS = [
    [5, 17, 3],
    [9, 1, 44, 2, 70, 8, 11],
    [100, 4, 6, 31, 2, 9, 9, 12, 64, 3, 77, 50],
    [7, 7],
]
P_VALUE = 1e-3  # reject "same distribution" below this; the seeds are fixed, so no flakes


# ---- the kernel alone ------------------------------------------------------------------------
def _dists(V, n, seed):
    """n random distributions over V tokens, some with zeros (as top-k / top-p leave them)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V) * 0.7, size=n)
    p[p < 0.04] = 0.0
    return jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)


@functools.partial(jax.jit, static_argnums=(2,))
def _draws(p, q, n):
    """n independent runs of one speculative step: drafts d_i ~ q_i, then accept/resample."""
    K = q.shape[0]

    def one(key):
        kd, ka = jax.random.split(key)
        d = jax.random.categorical(kd, jnp.log(q), axis=-1).astype(jnp.int32)  # [K]
        a, y = speculative_accept(p[None], q[None], d[None], ka[None])
        emitted = jnp.where(jnp.arange(K + 1) < a[0], jnp.append(d, 0), y[0])
        return a[0], emitted

    return jax.vmap(one)(jax.random.split(jax.random.key(0), n))


def _chi2_p(observed, expected_probs):
    """p-value of a chi-square goodness-of-fit test (cells with zero probability must be empty)."""
    observed = np.asarray(observed, float)
    e = np.asarray(expected_probs, float) * observed.sum()
    assert observed[e == 0].sum() == 0, "a token of probability 0 was emitted"
    keep = e > 0
    return stats.chisquare(observed[keep], e[keep]).pvalue


def test_accept_rule_emits_the_target_distribution():
    V, N = 6, 200_000
    p = _dists(V, 3, seed=1)  # p_0, p_1, p_2
    q = _dists(V, 2, seed=2)  # q_1, q_2 (K = 2)
    a, emitted = jax.device_get(_draws(p, q, N))
    # First token ~ p_0; acceptance of d_1 = sum_x min(p_0(x), q_1(x)).
    assert _chi2_p(np.bincount(emitted[:, 0], minlength=V), p[0]) > P_VALUE
    beta = float(jnp.minimum(p[0], q[0]).sum())
    rate = float(np.mean(a >= 1))
    assert abs(rate - beta) < 4 * np.sqrt(beta * (1 - beta) / N), (rate, beta)
    # Given d_1 accepted, the second token (accepted d_2 or resampled) ~ p_1, independently.
    second = emitted[a >= 1, 1]
    assert _chi2_p(np.bincount(second, minlength=V), p[1]) > P_VALUE
    beta2 = float(jnp.minimum(p[1], q[1]).sum())
    rate2 = float(np.mean(a[a >= 1] >= 2))
    n2 = int(np.sum(a >= 1))
    assert abs(rate2 - beta2) < 4 * np.sqrt(beta2 * (1 - beta2) / n2), (rate2, beta2)
    # After both accepted, the bonus token ~ p_2.
    assert _chi2_p(np.bincount(emitted[a == 2, 2], minlength=V), p[2]) > P_VALUE


def test_accept_rule_is_greedy_on_one_hot_distributions():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 9)), jnp.float32)
    zero = jnp.zeros((3,))
    p = token_probs(logits, zero, zero.astype(jnp.int32), zero + 1)  # one-hot argmax
    target = jnp.argmax(logits, -1)  # [3, 3]
    drafts = jnp.stack([target[:, 0], (target[:, 1] + 1) % 9], axis=1)  # [3, 2]: right, wrong
    drafts = drafts.at[1, 0].set((target[1, 0] + 1) % 9)  # row 1 wrong at once
    q = jax.nn.one_hot(drafts, 9)
    keys = jax.random.split(jax.random.key(3), 3)
    a, y = speculative_accept(p, q, drafts.astype(jnp.int32), keys)
    np.testing.assert_array_equal(a, [1, 0, 1])
    np.testing.assert_array_equal(y, [target[0, 1], target[1, 0], target[2, 1]])


# ---- generate(draft="mtp") -------------------------------------------------------------------
@functools.cache
def _model(depth: int):
    cfg = load_preset("v3-tiny").replace(num_nextn_predict_layers=depth)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(1))
    model.lm_head[...] = model.lm_head[...] * 20.0  # O(1) logits: well separated argmaxes
    D = cfg.hidden_size
    w = model.mtp.eh_proj[...]  # [depth, 2D, D]: [emb; h] -> D; a dominant copy of h^{k-1}
    model.mtp.eh_proj[...] = w.at[:, D:, :].add(30.0 * jnp.eye(D)[None])
    return model


def _stops(tokens):
    """One stop id per prompt, from the rows' unstopped outputs (row 1's 6th token)."""
    return [[tokens[0][-1]], [tokens[1][5]], [tokens[2][2]], [tokens[3][9]]]


@pytest.mark.parametrize("depth,k", [(1, 2), (2, 1), (2, 3)])
def test_greedy_speculative_equals_greedy(depth, k):
    """1 or 2 MTP modules, k below, at and above the number of modules (recursion)."""
    model = _model(depth)
    run = functools.partial(generate, model, PROMPTS, max_new_tokens=12, max_len=MAX_LEN)
    no_stop = [[127]] * 4  # one stop id per row in every call: one compiled program
    results = []
    for stop in (no_stop, _stops(run(stop_token_ids=no_stop).tokens)):
        plain = run(stop_token_ids=stop)
        spec = run(stop_token_ids=stop, draft="mtp", num_draft_tokens=k)
        assert spec.tokens == plain.tokens
        assert spec.finish_reasons == plain.finish_reasons
        for a, b in zip(spec.logprobs, plain.logprobs, strict=True):
            assert_close(np.array(a), np.array(b), **MODEL_FP32)
        results.append(spec)
    st = results[0].stats["speculative"]
    assert st["num_draft_tokens"] == k and st["drafted_tokens"] == k * st["verify_steps"]
    assert 0 < st["accepted_tokens"] < st["drafted_tokens"]  # both paths taken
    assert st["mean_accepted_length"] > 1.0
    assert results[0].stats["compilations"] <= 2
    assert results[1].finish_reasons[1] == "stop" and len(results[1].tokens[1]) <= 6


def test_sampled_speculative_matches_target_distribution():
    """The first three tokens of sampled speculative decoding against the exact joint of the
    target with temperature, top-k and top-p (first token: plain sampler, then two
    speculative steps' worth with k = 2)."""
    # The buckets of the greedy (1, 2) case (prompt <= 16, out_len 16): the same programs.
    model, prompt = _model(1), [9, 1, 44, 2, 70, 8, 11, 5, 17]
    temp, top_k, top_p = 0.7, 3, 0.95
    counts: dict[tuple[int, ...], int] = {}
    accepted = 0
    for seed in range(250):
        res = generate(
            model, [prompt] * 4, max_new_tokens=9, max_len=MAX_LEN, temperature=temp,
            top_k=top_k, top_p=top_p, seed=seed, draft="mtp", num_draft_tokens=2,
            stop_token_ids=[[127]] * 4,
        )  # fmt: skip
        accepted += res.stats["speculative"]["accepted_tokens"]
        for t in res.tokens:
            counts[tuple(t[:3])] = counts.get(tuple(t[:3]), 0) + 1
    assert accepted > 0

    # Exact joint by enumeration: full forward over every 3-token continuation of the support.
    forward = jax.jit(lambda ids: model(ids).logits)

    def dist(prefixes):
        ids = np.zeros((32, 16), np.int32)  # one compiled shape; causal, so padding is unseen
        for i, pre in enumerate(prefixes):
            ids[i, : len(pre)] = pre
        n = len(prefixes)
        last = forward(jnp.asarray(ids))[jnp.arange(n), jnp.asarray([len(x) - 1 for x in prefixes])]
        p = token_probs(
            last[:, None],
            jnp.full((n,), temp),
            jnp.full((n,), top_k, jnp.int32),
            jnp.full((n,), top_p),
        )[:, 0]
        return np.asarray(p)

    joint = {(): 1.0}
    for _ in range(3):
        keys = list(joint)
        p = dist([prompt + list(k) for k in keys])
        joint = {
            k + (int(t),): joint[k] * float(p[i, t])
            for i, k in enumerate(keys)
            for t in np.flatnonzero(p[i] > 0)
        }
    assert set(counts) <= set(joint), "a sequence of target probability 0 was emitted"
    cells = sorted(joint)
    obs = np.array([counts.get(c, 0) for c in cells], float)
    exp = np.array([joint[c] for c in cells])
    exp *= obs.sum() / exp.sum()
    small = exp < 5  # pool rare sequences into one cell
    obs = np.append(obs[~small], obs[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
    assert stats.chisquare(obs, exp).pvalue > P_VALUE


def test_filters_of_token_probs_match_the_sampler():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 1, 50)) * 3, jnp.float32)
    t, k, p = jnp.asarray([0.5, 1.3]), jnp.asarray([5, 0], jnp.int32), jnp.asarray([1.0, 0.6])
    probs = token_probs(logits, t, k, p)[:, 0]
    order, kept = filtered_logits(logits[:, 0], t, k, p)
    expect = np.zeros((2, 50))
    np.put_along_axis(expect, np.asarray(order), np.asarray(jax.nn.softmax(kept, -1)), -1)
    assert_close(np.asarray(probs), expect, **MODEL_FP32)
    assert (np.asarray(probs[0]) > 0).sum() == 5


def test_draft_needs_mtp_modules():
    """(draft / num_draft_tokens values: tests/inference/test_generate.py.)"""
    cfg = load_preset("v3-tiny").replace(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        generate(DeepSeekModel(cfg, rngs=nnx.Rngs(0)), [[1, 2]], draft="mtp")
