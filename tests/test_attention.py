"""Standard MHA/GQA attention: a hand-written numpy reference, the KV-cache decode contract, the
dense model built from it, its config validation and its sharding axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.attention import Attention, KVCache, init_kv_cache
from deepseek_jax.config import ModelConfig, load_preset
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.sharding.rules import get_rules, spec_for
from deepseek_jax.testing import MODEL_FP32, assert_close


def _cfg(kv_heads=2, **kw):
    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
    )
    return load_preset("dense-small").replace(**(small | kw))


# Eager NNX calls dispatch op by op (seconds each on a busy CPU): run everything jitted.
@nnx.jit
def _call(module, *args):
    return module(*args)


@nnx.jit
def _decode(module, *args):
    return module.decode(*args)


def _x(cfg, B=2, T=10, seed=4):
    return jax.random.normal(jax.random.key(seed), (B, T, cfg.hidden_size))


def numpy_attention(attn, cfg, x, pos, seg=None):
    """Per head, float64: half-split RoPE on q and k, head i reads kv head i // (N / N_kv)."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
    N, K, H = cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)  # [H/2]
    ang = np.asarray(pos, np.float64)[..., None] * inv  # [B, T, H/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rope(v):  # rotate (v_j, v_{j + H/2})
        a, b = v[..., : H // 2], v[..., H // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    q = rope(np.einsum("btd,dnh->btnh", x, wq))
    k = rope(np.einsum("btd,dkh->btkh", x, wk))
    v = np.einsum("btd,dkh->btkh", x, wv)
    B, T = x.shape[:2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for i in range(N):
            j = i // (N // K)
            s = q[b, :, i] @ k[b, :, j].T / np.sqrt(H)  # [T, S]
            allowed = np.tril(np.ones((T, T), bool))
            if seg is not None:
                allowed &= seg[b][:, None] == seg[b][None, :]
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, i] = (p / p.sum(-1, keepdims=True)) @ v[b, :, j]
    return np.einsum("btnh,nhd->btd", out, wo)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_attention_matches_numpy_on_packed_rows(kv_heads):
    cfg = _cfg(kv_heads)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = _x(cfg)
    seg = np.array([[1] * 4 + [2] * 6, [1] * 10])
    pos = np.array([list(range(4)) + list(range(6)), list(range(10))], np.int32)
    out = _call(attn, x, jnp.asarray(pos), jnp.asarray(seg))
    assert_close(out, numpy_attention(attn, cfg, x, pos, seg), **MODEL_FP32)


def test_kv_cache_decode_ragged_rows_equal_full_forward():
    cfg = _cfg(2)
    attn = Attention(cfg, rngs=nnx.Rngs(1))
    B, T, S = 2, 9, 12
    x = _x(cfg, B, T)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    full = _call(attn, x, pos)
    cache = init_kv_cache(cfg, B, S)
    assert cache.k.shape == (B, S, cfg.kv_heads, cfg.attn_head_dim)
    # Ragged prefill: row 0 has 5 prompt tokens, row 1 has 3 (right-padded to 5 with garbage).
    lens = np.array([5, 3])
    xp = x[:, :5].at[1, 3:].set(100.0)
    out, cache = _decode(attn, xp, pos[:, :5], cache)
    assert_close(out[0], full[0, :5], **MODEL_FP32)
    assert_close(out[1, :3], full[1, :3], **MODEL_FP32)
    # Then one token per row at each row's own next position: the padded slots get overwritten.
    for step in range(4):
        p = jnp.asarray(lens + step, jnp.int32)[:, None]  # [B, 1]
        xt = x[jnp.arange(B)[:, None], p]  # [B, 1, D]
        out, cache = _decode(attn, xt, p, cache)
        for b in range(B):
            assert_close(out[b, 0], full[b, int(p[b, 0])], **MODEL_FP32)


def test_out_of_range_positions_do_not_touch_the_cache():
    cfg = _cfg(2)
    attn = Attention(cfg, rngs=nnx.Rngs(2))
    S = 6
    x = _x(cfg, 2, 4)
    cache = init_kv_cache(cfg, 2, S)
    _, cache = _decode(attn, x, jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4)), cache)
    bad = jnp.array([[S, S + 3], [-1, 2 * S]], jnp.int32)
    _, after = _decode(attn, x[:, :2], bad, cache)
    np.testing.assert_array_equal(np.asarray(after.k), np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(after.v), np.asarray(cache.v))


def test_dense_model_decode_equals_forward():
    cfg = _cfg(2)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.dense_layers.attn, Attention) and model.moe_layers is None
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    full = _call(model, ids).logits
    caches = model.init_cache(2, 12)
    assert len(caches) == 1 and isinstance(caches[0], KVCache)
    assert caches[0].k.shape == (2, 2, 12, 2, 8)  # [L, B, S, N_kv, H]
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    logits, caches = _decode(model, ids[:, :6], caches, pos[:, :6])
    assert_close(logits, full[:, :6], **MODEL_FP32)
    for t in range(6, 10):
        logits, caches = _decode(model, ids[:, t : t + 1], caches, pos[:, t : t + 1])
        assert_close(logits[:, 0], full[:, t], **MODEL_FP32)
    with pytest.raises(ValueError, match="positions"):
        model.decode(ids[:, :2], caches, pos[:, :3])


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(attention_type="gqa"), "attention_type"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(head_dim=None, hidden_size=30), "head_dim"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        _cfg(2, **changes)


def test_mla_rejects_fewer_kv_heads():
    with pytest.raises(ValueError, match=r"ModelConfig\.num_key_value_heads=2"):
        load_preset("v3-tiny").replace(num_key_value_heads=2)


def test_presets_and_yaml_roundtrip():
    cfg = _cfg(2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    hub = cfg.to_hf_dict()  # exported as a LlamaForCausalLM config.json
    assert (hub["model_type"], hub["num_key_value_heads"], hub["head_dim"]) == ("llama", 2, 8)
    assert ModelConfig.from_dict(hub) == cfg.replace(dtype="bfloat16")  # hub dtype is storage
    with pytest.raises(ValueError, match="rope_interleave=False"):
        cfg.replace(rope_interleave=True).to_hf_dict()
    assert (cfg.kv_heads, cfg.attn_head_dim, cfg.rope_dim) == (2, 8, 8)
    llm67 = load_preset("deepseek-llm-67b")
    assert (llm67.num_attention_heads, llm67.kv_heads, llm67.attn_head_dim) == (64, 8, 128)
    assert llm67.softmax_scale == pytest.approx(128**-0.5)


def test_kv_heads_logical_axis_is_sharded_over_tensor():
    cfg = load_preset("deepseek-llm-67b")
    rules = get_rules("fsdp_ep_tp")
    assert rules["kv_heads"] == "tensor"
    mesh = {"data": 1, "fsdp": 4, "expert": 1, "tensor": 8, "stage": 1}
    D, K, H = cfg.hidden_size, cfg.kv_heads, cfg.attn_head_dim
    spec = spec_for("wk", (D, K, H), ("embed", "kv_heads", "head_dim"), rules, mesh)
    assert tuple(spec) == ("fsdp", "tensor", None)
    with pytest.raises(ValueError, match="kv_heads.*not divisible"):
        spec_for("wk", (D, K, H), ("embed", "kv_heads", "head_dim"), rules, dict(mesh, tensor=16))


def test_fp8_linear_runs_standard_attention():
    """cfg.fp8 routes q/k/v/o and the FFN through the block-scaled FP8 kernels (see
    tests/test_fp8_model.py for the error bound: two E4M3 matmul errors, ~5.1% RMS each)."""
    cfg = _cfg(2, hidden_size=64, head_dim=16)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    a = _call(DeepSeekModel(cfg, rngs=nnx.Rngs(0)), ids).logits
    b = _call(DeepSeekModel(cfg.replace(fp8=True), rngs=nnx.Rngs(0)), ids).logits
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert 1e-3 < rel < 2 * (2 / 3) ** 0.5 * 2**-4, rel


def test_causal_query_blocks_match_numpy_on_long_packed_rows():
    """T = 256: the causal attention runs in 4 query blocks (rows [a, b) over keys [0, b)); a
    document boundary inside a block and one on a block edge; GQA."""
    from deepseek_jax.mla import causal_query_blocks

    assert causal_query_blocks(256) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert causal_query_blocks(128) == [(0, 64), (64, 128)] and causal_query_blocks(100) == [
        (0, 100)
    ]
    cfg = _cfg(2)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = _x(cfg, T=256)
    seg = np.array([[1] * 100 + [2] * 28 + [3] * 128, [1] * 256])
    pos = np.array([[*range(100), *range(28), *range(128)], list(range(256))], np.int32)
    out = _call(attn, x, jnp.asarray(pos), jnp.asarray(seg))
    assert_close(out, numpy_attention(attn, cfg, x, pos, seg), **MODEL_FP32)
