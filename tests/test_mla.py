"""MLA: the absorbed latent-cache path against the naive expand-K/V path, masks, and a
hand-written numpy attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.mla import MLA, init_cache
from deepseek_jax.rope import rope_tables
from deepseek_jax.testing import MODEL_FP32, assert_close


@pytest.fixture(scope="module", params=["q_lora", "no_q_lora"])
def mla(request):
    cfg = load_preset("v3-tiny")
    if request.param == "no_q_lora":
        cfg = cfg.replace(q_lora_rank=None, rope_interleave=False, rope_scaling=None)
    return cfg, MLA(cfg, rngs=nnx.Rngs(3))


def _inputs(cfg, B=2, T=10):
    x = jax.random.normal(jax.random.key(4), (B, T, cfg.hidden_size))
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


def test_absorbed_prefill_and_decode_equal_naive(mla):
    cfg, attn = mla
    x, pos = _inputs(cfg)
    full = attn(x, pos)
    cache = init_cache(cfg, 2, 16)
    out, cache = attn.decode(x[:, :6], pos[:, :6], cache)  # prefill 6 tokens
    assert_close(out, full[:, :6], **MODEL_FP32)
    for t in range(6, 10):  # then one token at a time
        out, cache = attn.decode(x[:, t : t + 1], pos[:, t : t + 1], cache)
        assert_close(out[:, 0], full[:, t], **MODEL_FP32)
    # The cache holds only the latent and the shared rope key: C + R values per token.
    assert cache.c_kv.shape[-1] + cache.k_rope.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def numpy_mla(attn, cfg, x, pos):
    """Eq. 9-19 of the V2 report, written out per head with numpy."""
    x = np.asarray(x, np.float64)
    p = lambda v: np.asarray(v[...], np.float64)

    def rms(v, w):
        return v / np.sqrt((v**2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

    cos, sin = (np.asarray(a, np.float64) for a in rope_tables(cfg, pos))

    def rope(v):  # [B, T, ..., R]
        c = cos.reshape(cos.shape[:2] + (1,) * (v.ndim - 3) + cos.shape[2:])
        s = sin.reshape(c.shape)
        if cfg.rope_interleave:
            a, b = v[..., 0::2], v[..., 1::2]
            out = np.empty_like(v)
            out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
            return out
        a, b = np.split(v, 2, axis=-1)
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    if cfg.q_lora_rank:
        q = np.einsum("btq,qnh->btnh", rms(x @ p(attn.wq_a), p(attn.q_norm.weight)), p(attn.wq_b))
    else:
        q = np.einsum("btd,dnh->btnh", x, p(attn.wq))
    nope = cfg.qk_nope_head_dim
    q_nope, q_rope = q[..., :nope], rope(q[..., nope:])
    kv = x @ p(attn.wkv_a)
    c_kv = rms(kv[..., : cfg.kv_lora_rank], p(attn.kv_norm.weight))
    k_rope = rope(kv[..., cfg.kv_lora_rank :])
    kvb = np.einsum("btc,cnh->btnh", c_kv, p(attn.wkv_b))
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    B, T, N = q.shape[:3]
    out = np.zeros((B, T, N, cfg.v_head_dim))
    for b in range(B):
        for n in range(N):
            k = np.concatenate([k_nope[b, :, n], k_rope[b]], -1)  # shared rope key
            qq = np.concatenate([q_nope[b, :, n], q_rope[b, :, n]], -1)
            s = qq @ k.T * cfg.softmax_scale
            s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (w / w.sum(-1, keepdims=True)) @ v[b, :, n]
    return np.einsum("btnv,nvd->btd", out, p(attn.wo))


@pytest.mark.parametrize("T", [7, 256])  # 256: four causal query blocks (causal_query_blocks)
def test_matches_numpy_equations(mla, T):
    cfg, attn = mla
    x, pos = _inputs(cfg, T=T)
    out = nnx.jit(lambda m, x, p: m(x, p))(attn, x, pos)
    assert_close(out, numpy_mla(attn, cfg, x, pos), **MODEL_FP32)


def test_causal_query_blocks_keep_the_gradient(mla, monkeypatch):
    """T = 128 in two query blocks: output and gradients (input and every weight) equal the
    one-block attention over the full [T, T] scores; a document boundary inside block 2."""
    import deepseek_jax.mla as mla_mod

    cfg, attn = mla
    x, pos = _inputs(cfg, T=128)
    seg = jnp.array([[1] * 90 + [2] * 38, [1] * 128])
    pos = jnp.where(seg == 2, pos - 90, pos)

    def grads():
        loss = lambda m, x: (m(x, pos, seg) ** 2).sum()
        return jax.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(attn, x)

    blocked = grads()
    monkeypatch.setattr(mla_mod, "causal_query_blocks", lambda T: [(0, T)])
    whole = grads()
    jax.tree.map(lambda a, b: assert_close(a, b, **MODEL_FP32), blocked, whole)


def test_packed_segments_equal_separate_sequences(mla):
    cfg, attn = mla
    x, _ = _inputs(cfg, B=1, T=10)
    seg = jnp.array([[1] * 4 + [2] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])
    packed = attn(x, pos, seg)
    a = attn(x[:, :4], pos[:, :4])
    b = attn(x[:, 4:], pos[:, 4:])
    assert_close(packed, jnp.concatenate([a, b], 1), **MODEL_FP32)
