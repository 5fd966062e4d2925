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


def _compiled(fn, *args):
    """fn(*args) as one jit (compile-bound: the suite compiles at LLVM level 0, tests/conftest)."""
    return jax.jit(fn)(*args)


def toy_stage(params, shared, x, inp, is_first, is_last):
    """Embedding on the first stage, a tanh layer per stage, squared error on the last."""
    x = jnp.where(is_first, inp["x"] @ shared["emb"], x)
    y = jnp.tanh(x @ params["w"] + params["b"])
    loss = jnp.mean((y @ shared["head"] - inp["t"]) ** 2)
    # A per-stage regulariser: every stage contributes to the loss, not only the last.
    reg = 0.01 * jnp.mean(y**2)
    return y, jnp.where(is_last, loss, 0.0) + reg, {"act_sum": jnp.sum(y)}


def reference(stage_params, shared, inputs, PP):
    """Loss, (stage, shared) grads and per-stage act_sums of the plain, unpipelined model: the
    stages chained for each micro-batch (vmapped), one jit."""

    def loss_fn(sp, sh):
        def one(inp):
            x, total, act_sums = jnp.zeros((B_MB, D)), 0.0, []
            for s in range(PP):
                p = jax.tree.map(lambda a, s=s: a[s], sp)
                x, loss, a = toy_stage(p, sh, x, inp, s == 0, s == PP - 1)
                total, act_sums = total + loss, act_sums + [a["act_sum"]]
            return total, jnp.stack(act_sums)

        losses, act_sums = jax.vmap(one)(inputs)  # [n_mb], [n_mb, PP]
        return losses.mean(), act_sums.sum(0)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    return _compiled(grad_fn, stage_params, shared)


def _problem(PP, n_mb, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)  # noqa: E731
    stage_params = {"w": f(PP, D, D), "b": f(PP, D)}
    shared = {"emb": f(4, D), "head": f(D, 2)}
    inputs = {"x": f(n_mb, B_MB, 4), "t": f(n_mb, B_MB, 2)}
    return stage_params, shared, inputs


def _stage_mesh(PP):
    """A 1-D mesh of the first PP devices over the `stage` axis."""
    return jax.make_mesh(
        (PP,), ("stage",), devices=jax.devices()[:PP], axis_types=(jax.sharding.AxisType.Auto,)
    )


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
    mesh = _stage_mesh(PP)
    sp, sh, inp = _problem(PP, n_mb)
    act = jax.ShapeDtypeStruct((B_MB, D), jnp.float32)
    loss, g_stage, g_shared, aux = _compiled(
        lambda a, b, c: pipeline_grads(toy_stage, a, b, c, act, schedule, mesh), sp, sh, inp
    )
    # Per-stage statistics summed over micro-batches, mirrored back to their stage for DualPipe.
    (ref_loss, ref_aux), (ref_gs, ref_gsh) = reference(sp, sh, inp, PP)
    assert_close(aux["act_sum"], ref_aux, **MODEL_FP32)
    assert_close(loss, ref_loss, **MODEL_FP32)
    for a, b in zip(
        jax.tree.leaves((g_stage, g_shared)), jax.tree.leaves((ref_gs, ref_gsh)), strict=True
    ):
        assert_close(a, b, **MODEL_FP32)


def _branch_counts(jaxpr) -> list[int]:
    """The number of branches of every `cond`/`switch` in a jaxpr, nested ones included."""
    counts = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            counts.append(len(eqn.params["branches"]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr or Jaxpr
                if hasattr(inner, "eqns"):
                    counts += _branch_counts(inner)
    return counts


@pytest.mark.parametrize("name, branches", [("1F1B", 2), ("ZB1P", 3), ("DualPipe", 4)])
def test_only_the_backward_kinds_a_schedule_uses_are_compiled(name, branches):
    """The backward slot switches over idle plus the kinds the schedule runs (1F1B: BW; ZB1P: B
    and W; DualPipe: B, W and BW): each branch is a stage forward and backward to compile."""
    PP, n_mb = 2, 4
    schedule = BUILDERS[name](PP, n_mb)
    mesh = _stage_mesh(PP)
    act = jax.ShapeDtypeStruct((B_MB, D), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda a, b, c: pipeline_grads(toy_stage, a, b, c, act, schedule, mesh))(
        *_problem(PP, n_mb)
    )
    assert max(_branch_counts(jaxpr.jaxpr)) == branches


def test_lockstep_tables_cover_every_op_once():
    sched = dualpipe_schedule(4, 8)
    tab = lockstep_tables(sched)
    n_ops = sum(len(r) for r in sched.ranks)
    assert int(tab.f_on.sum() + (tab.b_kind > 0).sum()) == n_ops
    # Overlapped F&B pairs share steps, so DualPipe needs fewer steps than it has ops per rank.
    assert tab.num_steps < max(len(r) for r in sched.ranks) * 2


# The DeepSeek model: 4 MoE layers (split over 2 or 4 stages), embedding + dense layer on the first
# stage, head + MTP on the last. Every case runs the same 16-row batch as 8 micro-batches, so one
# plain-model reference (loss, main loss, expert counts, gradients) serves them all.
N_MB, MODEL_B, MODEL_T = 8, 16, 8


@pytest.fixture(scope="module")
def deepseek():
    """(cfg, lcfg, model, batch, reference): the reference is the mean over the micro-batches
    (pipeline_stages.split_microbatches: micro-batch m holds rows m, m + N_MB, ...) of the plain
    model's total loss, its main loss, the summed expert counts and the parameter gradients."""
    from flax import nnx

    from deepseek_jax.config import load_preset
    from deepseek_jax.losses import LossConfig, total_loss
    from deepseek_jax.model import DeepSeekModel

    cfg = load_preset("v3-tiny").replace(num_hidden_layers=1 + 4, remat="none")
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    lcfg = LossConfig(seq_balance_alpha=0.01, expert_balance_alpha=0.003)
    ids = jax.random.randint(jax.random.key(1), (MODEL_B, MODEL_T), 0, cfg.vocab_size)
    batch = {
        "input_ids": ids,
        "labels": jnp.roll(ids, -1, 1),
        "loss_mask": jnp.ones((MODEL_B, MODEL_T), jnp.float32).at[:, -1].set(0),
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mbs = jax.tree.map(lambda a: jnp.stack([a[m::N_MB] for m in range(N_MB)]), batch)

    def ref_loss(p):  # mean over micro-batches of the plain model's total loss
        def one(_, mb):
            out = nnx.merge(graphdef, p, rest)(mb["input_ids"])
            loss_m, metrics = total_loss(out, mb, cfg, lcfg)
            return None, (loss_m, metrics["main_loss"], out.moe_stats.expert_counts.sum(1))

        _, (losses, mains, counts) = jax.lax.scan(one, None, mbs)  # one compiled model
        return losses.mean(), (counts.sum(0), mains.mean())

    ref = _compiled(jax.value_and_grad(ref_loss, has_aux=True), params)
    return cfg, lcfg, model, batch, ref


def _check_against_reference(deepseek, loss, grads, counts, parts):
    from flax import nnx

    (ref, (ref_counts, ref_main)), ref_grads = deepseek[-1]
    assert_close(loss, ref, **MODEL_FP32)
    assert_close(parts["main_loss"], ref_main, **MODEL_FP32)
    assert_close(counts, ref_counts)
    flat = dict(nnx.to_flat_state(grads))
    paths = [path for path, _ in nnx.to_flat_state(ref_grads)]
    assert set(flat) == set(paths)  # a gradient for every parameter
    for path, g in nnx.to_flat_state(ref_grads):
        assert_close(
            flat[path][...] if hasattr(flat[path], "get_value") else flat[path],
            g[...],
            **MODEL_FP32,
        )


# 1F1B on 2 stages of the DeepSeek model runs below with the experts sharded inside each stage,
# and tests/train/test_pipeline_train.py trains with it (three optimizer steps equal the plain
# step's); every schedule runs on 2, 4 and 8 toy stages above.
@pytest.mark.slow
@pytest.mark.parametrize("name, PP", [("ZB1P", 4), ("DualPipe", 2), ("DualPipe", 4)])
def test_deepseek_model_pipelined_equals_plain(deepseek, name, PP):
    """MoE layers across stages, embedding + dense layer on the first, head + MTP on the last."""
    from deepseek_jax.pipeline_stages import pipelined_value_and_grad

    _, lcfg, model, batch, _ = deepseek
    mesh = _stage_mesh(PP)
    schedule = BUILDERS[name](PP, N_MB)
    out = _compiled(lambda b: pipelined_value_and_grad(model, b, schedule, mesh, lcfg), batch)
    _check_against_reference(deepseek, *out)


@pytest.mark.slow
def test_pipeline_with_experts_sharded_inside_each_stage(deepseek):
    """A stage x expert mesh: the routed experts of each stage split over the expert axis."""
    from flax import nnx

    from deepseek_jax.pipeline_stages import pipelined_value_and_grad
    from deepseek_jax.sharding.rules import get_rules, param_shardings

    _, lcfg, model, batch, _ = deepseek
    model = nnx.clone(model)  # the fixture's parameters, sharded here (the fixture's stay put)
    mesh = jax.make_mesh(
        (2, 2),
        ("stage", "expert"),
        devices=jax.devices()[:4],
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, get_rules("ep"))))
    assert model.moe_layers.ffn.w_gate[...].sharding.spec[1] == "expert"
    sched = one_f_one_b_schedule(2, N_MB)
    out = _compiled(lambda b: pipelined_value_and_grad(model, b, sched, mesh, lcfg), batch)
    _check_against_reference(deepseek, *out)
