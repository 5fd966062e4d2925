"""The generation engine against full-forward recomputation, and its sampling/stop/stream rules.

Every V3 test uses the same buckets (batch <= 4, prompts <= 16 tokens, max_len=32, at most 8
new tokens), so the whole file compiles one prefill and one decode program per model config.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.data.tokenizer import ByteTokenizer
from deepseek_jax.inference.engine import generate, generate_stream
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.testing import MODEL_FP32, assert_close

MAX_LEN = 32
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 70, 8, 11], [100, 4, 6, 31, 2, 9, 9, 12, 64, 3, 77, 50]]


def _config(name):
    cfg = load_preset("v3-tiny")  # V3: sigmoid + noaux_tc group-limited routing, YaRN, MTP
    if name == "v2":  # softmax gate, group-limited greedy, unnormalised weights, no MTP
        cfg = cfg.replace(
            scoring_func="softmax",
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            num_nextn_predict_layers=0,
        )
    elif name == "v2_lite":  # no query compression, greedy routing, plain RoPE
        cfg = cfg.replace(
            q_lora_rank=None,
            scoring_func="softmax",
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_scaling=None,
            num_nextn_predict_layers=0,
        )
    return cfg


_MODELS = {}


def _model(name):
    if name not in _MODELS:
        model = DeepSeekModel(_config(name), rngs=nnx.Rngs(1))
        # O(1) logits so that greedy choices are well separated (default init gives ~0.05).
        model.lm_head[...] = model.lm_head[...] * 20.0
        _MODELS[name] = model
    return _MODELS[name]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def _next_logits(model, ids):
    """Full-forward logits [V] after the prefix `ids` (one compiled shape for every prefix)."""
    padded = np.zeros((1, MAX_LEN), np.int32)  # causal: the padding after the prefix is unseen
    padded[0, : len(ids)] = ids
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(padded)))[0, len(ids) - 1]


def _recompute(model, prompt, n, forced=None):
    """Greedy (or `forced`) tokens and raw log-probs by running the full forward each step."""
    ids = list(prompt)
    toks, lps = [], []
    for step in range(n):
        logits = _next_logits(model, ids)
        tok = int(np.argmax(logits)) if forced is None else forced[step]
        toks.append(tok)
        lps.append(float(jax.nn.log_softmax(jnp.asarray(logits))[tok]))
        ids.append(tok)
    return toks, lps


@pytest.mark.parametrize("name", ["v3", "v2", "v2_lite"])
def test_greedy_equals_full_recomputation_on_a_ragged_batch(name):
    model = _model(name)
    res = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN)
    assert res.finish_reasons == ["length"] * 3
    for i, prompt in enumerate(PROMPTS):
        toks, lps = _recompute(model, prompt, 8)
        assert res.tokens[i] == toks, f"row {i}"
        assert_close(np.array(res.logprobs[i]), np.array(lps), **MODEL_FP32)


def test_row_alone_equals_row_in_batch_and_buckets_are_reused():
    model = _model("v3")
    batch = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN)
    # Same buckets (batch 4, prompt 16, cache 32): different lengths and values compile nothing.
    again = generate(model, [PROMPTS[1], [3] * 16, [7]], max_new_tokens=5, max_len=MAX_LEN)
    assert again.stats["compilations"] == 0
    assert again.tokens[0] == batch.tokens[1][:5]
    alone = generate(model, [PROMPTS[2]], max_new_tokens=8, max_len=MAX_LEN)  # batch bucket 1
    assert alone.tokens[0] == batch.tokens[2]
    assert_close(np.array(alone.logprobs[0]), np.array(batch.logprobs[2]), **MODEL_FP32)


SAMPLED = dict(temperature=[0.8, 1.5, 0.0], top_k=[0, 5, 0], top_p=[0.9, 1.0, 1.0])


def test_fixed_seed_is_reproducible_and_mixed_parameters_share_a_program():
    model = _model("v3")
    a = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN, seed=3, **SAMPLED)
    b = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN, seed=3, **SAMPLED)
    c = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN, seed=4, **SAMPLED)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens[:2] != c.tokens[:2]
    greedy = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN)
    assert a.tokens[2] == greedy.tokens[2]  # temperature 0 in a sampled batch is still greedy
    assert b.stats["compilations"] == 0 and c.stats["compilations"] == 0
    # Sampled rows report raw log-probs, and row 1 (top_k=5) only draws among its top 5.
    _, lps = _recompute(model, PROMPTS[1], 8, forced=a.tokens[1])
    assert_close(np.array(a.logprobs[1]), np.array(lps), **MODEL_FP32)
    ids = list(PROMPTS[1])
    for t in a.tokens[1]:
        logits = _next_logits(model, ids)
        assert (logits > logits[t]).sum() < 5
        ids.append(t)


def test_stop_ids_end_rows_independently():
    model = _model("v3")
    ref = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN)
    stop0 = ref.tokens[0][3]
    first = ref.tokens[0].index(stop0)
    res = generate(
        model,
        PROMPTS,
        max_new_tokens=8,
        max_len=MAX_LEN,
        stop_token_ids=[[stop0], [], [ref.tokens[2][0]]],
    )
    assert res.tokens[0] == ref.tokens[0][: first + 1] and res.finish_reasons[0] == "stop"
    assert res.tokens[1] == ref.tokens[1] and res.finish_reasons[1] == "length"
    assert res.tokens[2] == ref.tokens[2][:1] and res.finish_reasons[2] == "stop"
    assert res.logprobs[0] == ref.logprobs[0][: first + 1]


def test_stop_strings_and_stream_equal_batch():
    model = _model("v3")
    tok = ByteTokenizer()  # ids 3..127 decode to single bytes
    ref = generate(model, PROMPTS, max_new_tokens=8, max_len=MAX_LEN, seed=5, **SAMPLED)
    text = tok.decode(ref.tokens[1])
    stop = text[4:6]
    cut = next(k for k in range(1, 9) if stop in tok.decode(ref.tokens[1][:k]))
    kw = dict(max_new_tokens=8, max_len=MAX_LEN, seed=5, stop_strings=[stop], tokenizer=tok)
    res = generate(model, PROMPTS, **kw, **SAMPLED)
    assert res.tokens[1] == ref.tokens[1][:cut] and res.finish_reasons[1] == "stop"
    for i in (0, 2):  # rows whose text does not contain the string run to the length limit
        if stop not in tok.decode(ref.tokens[i]):
            assert res.tokens[i] == ref.tokens[i] and res.finish_reasons[i] == "length"
    streamed = [[] for _ in PROMPTS]
    reasons = [None] * 3
    for chunk in generate_stream(model, PROMPTS, chunk_size=3, **kw, **SAMPLED):
        streamed[chunk.index] += chunk.tokens
        reasons[chunk.index] = chunk.finish_reason or reasons[chunk.index]
    assert streamed == res.tokens and reasons == res.finish_reasons


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
        (dict(prompts=[[1, 2], [3, 128]]), r"prompts\[1\]\[1\] = 128 .*\[0, 128\)"),
        (dict(prompts=[[1, -1]]), r"prompts\[0\]\[1\] = -1"),
        (dict(prompts=[[1] * 30], max_len=32), r"prompts\[0\] has 30 tokens.*max_len.*=32"),
        (dict(prompts=[[1], [1] * 250]), r"prompts\[1\] has 250.*max_position_embeddings=256"),
        (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
        (dict(prompts=[[1], [2]], temperature=[1.0, -1.0]), r"temperature\[1\]=-1.0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k=-1"),
        (dict(max_new_tokens=0), r"max_new_tokens=0"),
        (dict(draft="eagle"), r"draft='eagle': allowed None or 'mtp'"),
        (dict(num_draft_tokens=2), r"num_draft_tokens=2 needs draft='mtp'"),
        (dict(draft="mtp", num_draft_tokens=0), r"num_draft_tokens=0 must be a positive"),
        (dict(stop_strings=["x"]), r"stop_strings need a tokenizer"),
        (dict(prompts=[[1], [2]], top_p=[0.5]), r"top_p has 1 values for 2 prompts"),
    ],
)
def test_bad_input_names_the_prompt_and_the_limit(kwargs, match):
    model = _model("v3")
    kwargs = dict(prompts=[[1, 2, 3]], max_new_tokens=8) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, kwargs.pop("prompts"), **kwargs)
