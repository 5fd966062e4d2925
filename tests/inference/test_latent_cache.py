"""Per-row positions of the latent cache and the 8-bit (int8 / FP8 E4M3, per-token scale) cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.mla import MLA, init_cache, quantize_per_token, read_cache, write_cache
from deepseek_jax.testing import MODEL_FP32, assert_close


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_per_token_quantisation_against_numpy(dtype):
    x = (
        np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 32)))
        * np.array([1, 30])[:, None, None]
    )
    q, scale = quantize_per_token(jnp.asarray(x), dtype)
    qmax = 127.0 if dtype == jnp.int8 else 448.0
    want_scale = np.abs(x).max(-1) / qmax
    np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-6)
    back = np.asarray(q.astype(jnp.float32)) * np.asarray(scale)[..., None]
    # int8 rounds to the nearest step (error <= scale / 2); E4M3 keeps 3 mantissa bits
    # (relative error <= 2^-4 of the value, or half the smallest subnormal step).
    if dtype == jnp.int8:
        assert np.all(np.abs(back - x) <= want_scale[..., None] / 2 + 1e-6)
    else:
        bound = np.maximum(np.abs(x) * 2.0**-4, want_scale[..., None] * 2.0**-10)
        assert np.all(np.abs(back - x) <= bound + 1e-6)


def test_scatter_writes_per_row_positions_and_drops_out_of_range(tiny_cfg):
    cache = init_cache(tiny_cfg, 2, 6)
    C, R = tiny_cfg.kv_lora_rank, tiny_cfg.qk_rope_head_dim
    c_new = jnp.arange(2 * 2 * C, dtype=jnp.float32).reshape(2, 2, C) + 1
    k_new = jnp.ones((2, 2, R))
    positions = jnp.array([[0, 1], [4, 6]])  # row 1's second token is past the cache: dropped
    out = write_cache(cache, c_new, k_new, positions)
    c, _ = read_cache(out, jnp.float32)
    assert_close(c[0, :2], c_new[0], **MODEL_FP32)
    assert_close(c[1, 4], c_new[1, 0], **MODEL_FP32)
    assert float(jnp.abs(c[0, 2:]).sum()) == 0 and float(jnp.abs(c[1, :4]).sum()) == 0
    assert float(jnp.abs(c[1, 5]).sum()) == 0


def test_8bit_caches_perturb_attention_by_their_precision(tiny_cfg):
    # One MLA layer (the whole model would add discrete MoE routing flips on top).
    attn = MLA(tiny_cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 10, tiny_cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    ref, _ = attn.decode(x, pos, init_cache(tiny_cfg, 2, 12))
    errs = {}
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
        out, cache = attn.decode(x, pos, init_cache(tiny_cfg, 2, 12, dtype))
        assert cache.c_kv.dtype == dtype and cache.c_scale.shape == (2, 12)
        errs[dtype] = float(jnp.abs(out - ref).max()) / float(ref.std())
    # int8 keeps ~8 bits per value, E4M3 3 mantissa bits: both small, int8 the closer.
    assert 0 < errs[jnp.int8] < errs[jnp.float8_e4m3fn] < 0.25, errs
    assert errs[jnp.int8] < 0.05, errs
