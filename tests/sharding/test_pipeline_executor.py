"""The pipeline executor against the non-pipelined computation (toy stages, 8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.sharding.pipeline import lockstep_tables, pipeline_grads
from deepseek_jax.sharding.schedules import (
    dualpipe_schedule,
    one_f_one_b_schedule,
    zb1p_schedule,
)
from deepseek_jax.testing import MODEL_FP32, assert_close

D, B_MB = 8, 3


def toy_stage(params, shared, x, inp, is_first, is_last):
    """Embedding on the first stage, a tanh layer per stage, squared error on the last."""
    x = jnp.where(is_first, inp["x"] @ shared["emb"], x)
    y = jnp.tanh(x @ params["w"] + params["b"])
    loss = jnp.mean((y @ shared["head"] - inp["t"]) ** 2)
    # A per-stage regulariser: every stage contributes to the loss, not only the last.
    reg = 0.01 * jnp.mean(y**2)
    return y, jnp.where(is_last, loss, 0.0) + reg, {"act_sum": jnp.sum(y)}


def reference(stage_params, shared, inputs, PP):
    def loss_fn(sp, sh):
        total = 0.0
        n = inputs["x"].shape[0]
        for m in range(n):
            inp = jax.tree.map(lambda a, m=m: a[m], inputs)
            x = jnp.zeros((B_MB, D))
            for s in range(PP):
                p = jax.tree.map(lambda a, s=s: a[s], sp)
                x, loss, _ = toy_stage(p, sh, x, inp, s == 0, s == PP - 1)
                total = total + loss / n
        return total

    return jax.value_and_grad(loss_fn, argnums=(0, 1))(stage_params, shared)


def _problem(PP, n_mb, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)  # noqa: E731
    stage_params = {"w": f(PP, D, D), "b": f(PP, D)}
    shared = {"emb": f(4, D), "head": f(D, 2)}
    inputs = {"x": f(n_mb, B_MB, 4), "t": f(n_mb, B_MB, 2)}
    return stage_params, shared, inputs


BUILDERS = {"1F1B": one_f_one_b_schedule, "ZB1P": zb1p_schedule, "DualPipe": dualpipe_schedule}


@pytest.mark.parametrize(
    "name, PP, n_mb",
    [
        ("1F1B", 2, 3),
        ("1F1B", 4, 8),
        ("ZB1P", 4, 6),
        ("ZB1P", 8, 8),
        ("DualPipe", 2, 4),
        ("DualPipe", 4, 8),
        ("DualPipe", 8, 16),
    ],
)
def test_pipelined_loss_and_grads_equal_reference(name, PP, n_mb):
    schedule = BUILDERS[name](PP, n_mb)
    mesh = jax.make_mesh(
        (PP,), ("stage",), devices=jax.devices()[:PP], axis_types=(jax.sharding.AxisType.Auto,)
    )
    sp, sh, inp = _problem(PP, n_mb)
    act = jax.ShapeDtypeStruct((B_MB, D), jnp.float32)
    loss, g_stage, g_shared, aux = jax.jit(
        lambda a, b, c: pipeline_grads(toy_stage, a, b, c, act, schedule, mesh)
    )(sp, sh, inp)
    ref_loss, (ref_gs, ref_gsh) = reference(sp, sh, inp, PP)
    # Per-stage statistics summed over micro-batches, mirrored back to their stage for DualPipe.
    ref_aux = []
    for s in range(PP):
        total = 0.0
        for m in range(n_mb):
            x = jnp.zeros((B_MB, D))
            inp_m = jax.tree.map(lambda a, m=m: a[m], inp)
            for k in range(s + 1):
                p = jax.tree.map(lambda a, k=k: a[k], sp)
                x, _, a = toy_stage(p, sh, x, inp_m, k == 0, k == PP - 1)
            total = total + a["act_sum"]
        ref_aux.append(total)
    assert_close(aux["act_sum"], jnp.stack(ref_aux), **MODEL_FP32)
    assert_close(loss, ref_loss, **MODEL_FP32)
    for a, b in zip(
        jax.tree.leaves((g_stage, g_shared)), jax.tree.leaves((ref_gs, ref_gsh)), strict=True
    ):
        assert_close(a, b, **MODEL_FP32)


def test_lockstep_tables_cover_every_op_once():
    sched = dualpipe_schedule(4, 8)
    tab = lockstep_tables(sched)
    n_ops = sum(len(r) for r in sched.ranks)
    assert int(tab.f_on.sum() + (tab.b_kind > 0).sum()) == n_ops
    # Overlapped F&B pairs share steps, so DualPipe needs fewer steps than it has ops per rank.
    assert tab.num_steps < max(len(r) for r in sched.ranks) * 2


# 1F1B on 2 stages of the DeepSeek model is held by tests/train/test_pipeline_train.py (three
# optimizer steps equal the plain step's); every schedule runs on 2, 4 and 8 toy stages above.
@pytest.mark.parametrize("name, PP, n_mb", [("ZB1P", 4, 4), ("DualPipe", 2, 4), ("DualPipe", 4, 8)])
def test_deepseek_model_pipelined_equals_plain(name, PP, n_mb):
    """MoE layers across stages, embedding + dense layer on the first, head + MTP on the last."""
    from flax import nnx

    from deepseek_jax.config import load_preset
    from deepseek_jax.losses import LossConfig, total_loss
    from deepseek_jax.model import DeepSeekModel
    from deepseek_jax.pipeline_stages import pipelined_value_and_grad

    cfg = load_preset("v3-tiny").replace(num_hidden_layers=1 + 4, remat="none")
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    lcfg = LossConfig(seq_balance_alpha=0.01, expert_balance_alpha=0.003)
    B, T = 2 * n_mb, 8
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    batch = {
        "input_ids": ids,
        "labels": jnp.roll(ids, -1, 1),
        "loss_mask": jnp.ones((B, T), jnp.float32).at[:, -1].set(0),
    }
    mesh = jax.make_mesh(
        (PP,), ("stage",), devices=jax.devices()[:PP], axis_types=(jax.sharding.AxisType.Auto,)
    )
    schedule = BUILDERS[name](PP, n_mb)
    loss, grads, counts, parts = jax.jit(
        lambda b: pipelined_value_and_grad(model, b, schedule, mesh, lcfg)
    )(batch)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # Micro-batch m holds rows m, m + n_mb, ... (pipeline_stages.split_microbatches).
    mbs = jax.tree.map(lambda a: jnp.stack([a[m::n_mb] for m in range(n_mb)]), batch)

    def ref_loss(p):  # mean over micro-batches of the plain model's total loss
        def one(_, mb):
            out = nnx.merge(graphdef, p, rest)(mb["input_ids"])
            loss_m, metrics = total_loss(out, mb, cfg, lcfg)
            return None, (loss_m, metrics["main_loss"], out.moe_stats.expert_counts.sum(1))

        _, (losses, mains, counts) = jax.lax.scan(one, None, mbs)  # one compiled model
        return losses.mean(), (counts.sum(0), mains.mean())

    (ref, (ref_counts, ref_main)), ref_grads = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(
        params
    )
    assert_close(loss, ref, **MODEL_FP32)
    assert_close(parts["main_loss"], ref_main, **MODEL_FP32)
    assert_close(counts, ref_counts)
    flat = dict(nnx.to_flat_state(grads))
    for path, g in nnx.to_flat_state(ref_grads):
        assert_close(
            flat[path][...] if hasattr(flat[path], "get_value") else flat[path],
            g[...],
            **MODEL_FP32,
        )


def test_pipeline_with_experts_sharded_inside_each_stage():
    """A stage x expert mesh: the routed experts of each stage split over the expert axis."""
    from flax import nnx

    from deepseek_jax.config import load_preset
    from deepseek_jax.losses import LossConfig, total_loss
    from deepseek_jax.model import DeepSeekModel
    from deepseek_jax.pipeline_stages import pipelined_value_and_grad
    from deepseek_jax.sharding.rules import get_rules, param_shardings

    cfg = load_preset("v3-tiny").replace(num_hidden_layers=3, remat="none")
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    mesh = jax.make_mesh(
        (2, 2),
        ("stage", "expert"),
        devices=jax.devices()[:4],
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, get_rules("ep"))))
    assert model.moe_layers.ffn.w_gate[...].sharding.spec[1] == "expert"
    lcfg = LossConfig()
    ids = jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size)
    batch = {"input_ids": ids, "labels": jnp.roll(ids, -1, 1)}
    sched = one_f_one_b_schedule(2, 2)
    loss, grads, _, _ = jax.jit(lambda b: pipelined_value_and_grad(model, b, sched, mesh, lcfg))(
        batch
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def ref(p):
        mbs = [jax.tree.map(lambda a, m=m: a[m::2], batch) for m in range(2)]
        return sum(
            total_loss(nnx.merge(graphdef, p, rest)(mb["input_ids"]), mb, cfg, lcfg)[0] / 2
            for mb in mbs
        )

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref))(params)
    assert_close(loss, ref_loss, **MODEL_FP32)
    flat = dict(nnx.to_flat_state(grads))
    for path, g in nnx.to_flat_state(ref_grads):
        assert_close(flat[path][...], g[...], **MODEL_FP32)
