"""Whole-model invariants: shapes, causality, MTP wiring, decode path, gradients, scan."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.losses import LossConfig, total_loss
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.testing import MODEL_FP32, assert_close


def _ids(cfg, B=2, T=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def layer(stacked, i):
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_shapes_and_dtypes(tiny_cfg, tiny_model):
    ids = _ids(tiny_cfg)
    out = tiny_model(ids)
    B, T, V = 2, 12, tiny_cfg.vocab_size
    chex.assert_shape(out.logits, (B, T, V))
    chex.assert_shape(out.mtp_logits, (tiny_cfg.num_nextn_predict_layers, B, T, V))
    chex.assert_type(out.logits, jnp.float32)
    L = tiny_cfg.num_moe_layers + tiny_cfg.num_nextn_predict_layers  # MTP block is MoE too
    chex.assert_shape(out.moe_stats.expert_counts, (L, B, tiny_cfg.n_routed_experts))
    chex.assert_tree_all_finite(out)


def test_causality(tiny_cfg, tiny_model):
    ids = _ids(tiny_cfg)
    changed = ids.at[:, 7:].set((ids[:, 7:] + 5) % tiny_cfg.vocab_size)
    a, b = tiny_model(ids), tiny_model(changed)
    assert_close(a.logits[:, :7], b.logits[:, :7], **MODEL_FP32)
    assert not np.allclose(a.logits[:, 7:], b.logits[:, 7:])
    # MTP depth 1 at position i reads token i+1, so it is causal up to i+1.
    assert_close(a.mtp_logits[:, :, :6], b.mtp_logits[:, :, :6], **MODEL_FP32)


def test_mtp_matches_hand_written(tiny_cfg, tiny_model):
    m, cfg = tiny_model, tiny_cfg
    ids = _ids(cfg, T=9)
    pos = jnp.broadcast_to(jnp.arange(9), ids.shape)
    h = jnp.take(m.embed[...], ids, axis=0)
    for i in range(cfg.num_dense_layers):
        h, _ = layer(m.dense_layers, i)(h, pos)
    for i in range(cfg.num_moe_layers):
        h, _ = layer(m.moe_layers, i)(h, pos)
    main_logits = m.norm(h) @ m.lm_head[...]
    mtp = layer(m.mtp, 0)
    next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], 1)  # t_{i+1}
    emb = jnp.take(m.embed[...], next_ids, axis=0)
    x = jnp.concatenate([mtp.enorm(emb), mtp.hnorm(h)], -1) @ mtp.eh_proj[...]  # embedding first
    hk, _ = mtp.block(x, pos)
    mtp_logits = mtp.norm(hk) @ m.lm_head[...]  # shared output head
    out = m(ids)
    assert_close(out.logits, main_logits, **MODEL_FP32)
    assert_close(out.mtp_logits[0], mtp_logits, **MODEL_FP32)


def test_latent_cache_decode_equals_forward(tiny_cfg, tiny_model):
    ids = _ids(tiny_cfg, T=10)
    full = tiny_model(ids).logits
    caches = tiny_model.init_cache(2, 12)
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    logits, caches = tiny_model.decode(ids[:, :5], caches, pos[:, :5])
    assert_close(logits, full[:, :5], **MODEL_FP32)
    for t in range(5, 10):
        logits, caches = tiny_model.decode(ids[:, t : t + 1], caches, pos[:, t : t + 1])
        assert_close(logits[:, 0], full[:, t], **MODEL_FP32)


def test_packed_rows_do_not_interact(tiny_cfg, tiny_model):
    ids = _ids(tiny_cfg, B=1, T=12)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    packed = tiny_model(ids, positions=pos, segment_ids=seg).logits
    second = tiny_model(ids[:, 5:]).logits
    assert_close(packed[:, 5:], second, **MODEL_FP32)


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_gradients_finite_through_everything(tiny_cfg, tiny_model, impl):
    _, params, rest = nnx.split(tiny_model, nnx.Param, ...)
    # the same variables under a model whose MoE layers run `impl`
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: DeepSeekModel(tiny_cfg.replace(moe_impl=impl), rngs=nnx.Rngs(0)))
    )
    ids = _ids(tiny_cfg)
    batch = {"labels": jnp.roll(ids, -1, 1), "loss_mask": jnp.ones_like(ids).at[:, -1].set(0)}
    lcfg = LossConfig(
        expert_balance_alpha=0.003, device_balance_alpha=0.05, comm_balance_alpha=0.02, z_loss=1e-4
    )

    def loss_fn(p):
        out = nnx.merge(graphdef, p, rest)(ids)
        return total_loss(out, batch, tiny_cfg, lcfg)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)  # jitted: one compile, not eager ops
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(grads)
    # Every parameter receives gradient (nothing is accidentally disconnected).
    for path, g in nnx.to_flat_state(grads):
        assert float(jnp.abs(g[...]).max()) > 0, path


def _param_grads(model, ids, **kw):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest)(ids, **kw).logits.sum()
    return jax.jit(jax.grad(loss))(params)


def test_remat_policies_and_unroll_agree(tiny_cfg):
    ids = _ids(tiny_cfg)
    grads = [
        _param_grads(DeepSeekModel(tiny_cfg.replace(remat=r), rngs=nnx.Rngs(0)), ids)
        for r in ["none", "full", "dots"]
    ]
    # model.scan_layers off: a Python loop over the layers (what `unroll=True` also selects)
    looped = DeepSeekModel(tiny_cfg.replace(remat="full", scan_layers=False), rngs=nnx.Rngs(0))
    grads.append(_param_grads(looped, ids))
    for g in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g), strict=True):
            assert_close(a, b, **MODEL_FP32)


@pytest.mark.parametrize("scan", [True, False])
def test_scan_compile_size_independent_of_depth(tiny_cfg, scan):
    """The lowered program does not grow with the number of layers when they are scanned, and
    does with model.scan_layers off (a Python loop over the layers)."""
    sizes = []
    for L in (3, 9):
        cfg = tiny_cfg.replace(num_hidden_layers=L, scan_layers=scan)
        abstract = nnx.eval_shape(lambda cfg=cfg: DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        text = (
            jax.jit(lambda s, i, g=graphdef: nnx.merge(g, s)(i).logits).lower(state, ids).as_text()
        )
        sizes.append(len(text))
    if scan:
        assert abs(sizes[1] - sizes[0]) / sizes[0] < 0.02, sizes
    else:
        assert sizes[1] > 1.5 * sizes[0], sizes


def test_bf16_compute_runs(tiny_cfg):
    cfg = tiny_cfg.replace(dtype="bfloat16")
    m = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    ref = DeepSeekModel(tiny_cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg)
    out = m(ids).logits
    chex.assert_type(out, jnp.float32)
    # Same weights: bf16 compute tracks fp32 to bf16 precision on O(1) logits.
    assert float(jnp.abs(out - ref(ids).logits).max()) < 0.1
