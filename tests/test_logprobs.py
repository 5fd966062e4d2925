"""token_logprobs: chunked over time, equal to log_softmax of the full logits and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.logprobs import head_logprobs, token_logprobs
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.testing import MODEL_FP32, assert_close

B, T = 2, 11


@pytest.fixture(scope="module")
def model():
    # One layer keeps compiles short; V = 96 differs from every other dimension of the model.
    cfg = load_preset("v3-tiny").replace(
        num_hidden_layers=1, num_nextn_predict_layers=0, vocab_size=96, remat="none"
    )
    return DeepSeekModel(cfg, rngs=nnx.Rngs(0))


def _inputs(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    targets = rng.integers(0, vocab, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, 6:] = 2  # two packed documents in row 0
    seg[1, 9:] = 0  # padding in row 1
    pos = np.where(seg[0] == 1, np.arange(T), np.arange(T) - 6)
    positions = np.stack([pos, np.arange(T)]).astype(np.int32)
    return ids, targets, seg, positions


def _full(model, ids, targets, seg, positions):
    logits = model(ids, positions=positions, segment_ids=seg).logits
    return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def test_equals_log_softmax_of_full_logits(model):
    ids, targets, seg, positions = _inputs(model.cfg.vocab_size)
    # chunk 4 does not divide T = 11: the last chunk is padded.
    got = token_logprobs(model, ids, targets, positions=positions, segment_ids=seg, chunk_size=4)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    assert_close(got, _full(model, ids, targets, seg, positions), **MODEL_FP32)


def test_gradient_equals_full_logits_path(model):
    ids, targets, seg, positions = _inputs(model.cfg.vocab_size)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T)), jnp.float32)
    graphdef, params = nnx.split(model)

    def loss(params, chunked):
        m = nnx.merge(graphdef, params)
        if chunked:
            lp = token_logprobs(m, ids, targets, positions=positions, segment_ids=seg, chunk_size=4)
        else:
            lp = _full(m, ids, targets, seg, positions)
        return (lp * w).sum()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_chunk, g_full = grad(params, True), grad(params, False)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full), strict=True):
        assert_close(a, b, **MODEL_FP32)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_head_logprobs_and_entropy_match_numpy(chunk):
    rng = np.random.default_rng(2)
    h = rng.normal(size=(B, 7, 5)).astype(np.float32)
    W = rng.normal(size=(5, 13)).astype(np.float32)
    targets = rng.integers(0, 13, (B, 7)).astype(np.int32)
    logp, ent = head_logprobs(
        lambda x: x @ W, jnp.asarray(h), jnp.asarray(targets), chunk_size=chunk
    )
    z = h.astype(np.float64) @ W
    ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert_close(logp, np.take_along_axis(ls, targets[..., None], -1)[..., 0])
    assert_close(ent, -(np.exp(ls) * ls).sum(-1))
    with pytest.raises(ValueError, match="targets has shape"):
        head_logprobs(lambda x: x @ W, jnp.asarray(h), jnp.asarray(targets[:, :3]))
    with pytest.raises(ValueError, match="chunk_size=0"):
        head_logprobs(lambda x: x @ W, jnp.asarray(h), jnp.asarray(targets), chunk_size=0)


def test_only_a_chunk_of_logits_is_materialised(model):
    # The compiled program holds no [B, T, V] buffer: the largest f32 temporary with a vocab
    # dimension is one [B, chunk, V] slice.
    ids, targets, seg, positions = _inputs(model.cfg.vocab_size)
    V = model.cfg.vocab_size
    graphdef, params = nnx.split(model)

    def f(params):
        m = nnx.merge(graphdef, params)
        return token_logprobs(
            m, ids, targets, segment_ids=seg, positions=positions, chunk_size=2
        ).sum()

    hlo = jax.jit(jax.grad(f)).lower(params).as_text()
    assert f"{B}x2x{V}xf32" in hlo
    assert f"x{T}x{V}x" not in hlo
