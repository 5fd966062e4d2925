"""The DeepSeek model cut into pipeline stages for `sharding.pipeline.pipeline_grads`.

Stage s holds MoE layers [s * L/PP, (s + 1) * L/PP) (a dense model, DeepSeek LLM, splits its one
stack of dense layers the same way). The first stage also runs the embedding and the dense
layers, the last the final norm, output head and the MTP modules (their inputs, the token ids,
travel with every micro-batch). Those shared pieces are replicated over the stage axis; their
gradients are summed over stages. Every stage adds the balance losses of its own MoE layers;
the last adds the LM and MTP losses, so the pipelined loss equals the plain model's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.losses import LossConfig, balance_loss, lm_loss
from deepseek_jax.model import DeepSeekModel, ModelOutput
from deepseek_jax.sharding.parallel import ParallelConfig
from deepseek_jax.sharding.pipeline import pipeline_grads
from deepseek_jax.sharding.schedules import Schedule

BATCH_KEYS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")


def _stage_split(tree, PP: int):
    """[L, ...] leaves -> [PP, L/PP, ...]."""
    return jax.tree.map(lambda a: a.reshape((PP, a.shape[0] // PP) + a.shape[1:]), tree)


def _stage_merge(tree):
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)


def split_microbatches(batch: dict, M: int) -> dict:
    """[B, ...] -> [M, B/M, ...]; micro-batch m takes rows m, m + M, ... so that each keeps the
    batch's data-parallel split (a row's shard does not move). Gradient accumulation and the
    pipeline split the same way, so both see the same micro-batches."""
    out = {}
    for k, a in batch.items():
        if a is None:
            continue
        if a.shape[0] % M:
            raise ValueError(
                f"batch[{k!r}] of {a.shape[0]} rows does not split into {M} micro-batches"
            )
        out[k] = a.reshape((a.shape[0] // M, M) + a.shape[1:]).swapaxes(0, 1)
    return out


def pipelined_value_and_grad(
    model: DeepSeekModel,
    batch: dict,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    lcfg: LossConfig,
    mtp_lambda: float | jax.Array | None = None,
):
    """Loss, parameter gradients and expert counts of one step, computed with `schedule`.

    Args:
      model: the DeepSeekModel (its moe layer count must be divisible by the stage count).
      batch: [B, T] arrays (input_ids, labels, loss_mask, segment_ids, positions); B is split
        into schedule.num_microbatches micro-batches.
      schedule: a 1F1B / ZB1P / DualPipe schedule over mesh.shape["stage"] ranks.
      mesh: the device mesh.
      lcfg: loss weights.
    Returns:
      (loss = mean over micro-batches of total_loss, grads as an nnx.State shaped like
       `nnx.state(model, nnx.Param)`, expert counts [L_moe + n_mtp, E] summed over the batch
       (None for a dense model), {"main_loss", "mtp_loss"} means over micro-batches).
    """
    cfg = model.cfg
    PP = schedule.num_ranks
    if cfg.num_moe_layers % PP:
        raise ValueError(
            f"{cfg.num_moe_layers} MoE layers do not split into {PP} stages "
            "(num_hidden_layers - first_k_dense_replace must be divisible by stage)"
        )
    key = model.pipeline_stack()  # the stack split over the stages
    if not cfg.is_moe and cfg.num_dense_layers % PP:
        raise ValueError(
            f"{cfg.num_dense_layers} layers do not split into {PP} stages "
            "(num_hidden_layers must be divisible by stage)"
        )
    # Inside the stage shard_map the executor places activations itself: no constraints, and
    # the MoE runs its single-device plan on each stage's tokens.
    model = model.replace_parallel(ParallelConfig())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    stage_params = _stage_split(params[key], PP)
    has_rest = key in rest  # MoE stacks hold the routing bias; dense ones only parameters
    stage_rest = _stage_split(rest[key], PP) if has_rest else nnx.State({})
    params = nnx.State({k: v for k, v in params.items() if k != key})
    rest = nnx.State({k: v for k, v in rest.items() if k != key})
    M = schedule.num_microbatches
    mbs = split_microbatches({k: batch.get(k) for k in BATCH_KEYS}, M)
    B_mb, T = mbs["input_ids"].shape[1:]
    act = jax.ShapeDtypeStruct((B_mb, T, cfg.hidden_size), cfg.compute_dtype)
    E = cfg.n_routed_experts or 1  # dense: empty placeholder counts, dropped at the end

    def stage_fn(sp: Any, shared: Any, x, inp: dict, is_first, is_last):
        p = nnx.State({**shared["params"], key: sp["params"]})
        r = nnx.State({**shared["rest"], **({key: sp["rest"]} if has_rest else {})})
        m = nnx.merge(graphdef, p, r)
        ids = inp["input_ids"]
        ctx = m.context(ids, inp.get("positions"), inp.get("segment_ids"))
        first = (lambda: m.embed_and_dense(ids, ctx)) if cfg.is_moe else (lambda: m._embed(ids))
        h = jax.lax.cond(is_first, first, lambda: x)
        h, stats = m.run_stack(getattr(m, key), h, ctx)
        loss, _ = balance_loss(stats, cfg, lcfg)
        counts = {"moe": stats.expert_counts.sum(1) if stats is not None else jnp.zeros((0, E))}

        def last(h):
            logits, mtp_logits, mtp_stats = m.outputs(h, ids, ctx)
            l_lm, lm = lm_loss(ModelOutput(logits, mtp_logits, None), inp, lcfg, mtp_lambda)
            l_bal, _ = balance_loss(mtp_stats, cfg, lcfg)
            n = cfg.num_nextn_predict_layers
            c = mtp_stats.expert_counts.sum(1) if mtp_stats is not None else jnp.zeros((n, E))
            parts = jnp.stack([lm["main_loss"], lm.get("mtp_loss", 0.0)]).astype(jnp.float32)
            return l_lm + l_bal, c, parts

        def not_last(h):
            zero = jnp.zeros((), jnp.float32)
            return zero, jnp.zeros((cfg.num_nextn_predict_layers, E)), jnp.zeros(2, jnp.float32)

        l_last, counts["mtp"], counts["lm"] = jax.lax.cond(is_last, last, not_last, h)
        return h.astype(act.dtype), loss + l_last, counts

    loss, g_stage, g_shared, counts = pipeline_grads(
        stage_fn,
        {"params": stage_params, "rest": stage_rest},
        {"params": params, "rest": rest},
        mbs,
        act,
        schedule,
        mesh,
    )
    grads = nnx.State({**g_shared["params"], key: _stage_merge(g_stage["params"])})
    expert_counts = jnp.concatenate([_stage_merge(counts["moe"]), counts["mtp"][-1]], axis=0)
    expert_counts = expert_counts if cfg.is_moe else None
    main, mtp = counts["lm"][-1] / M  # the last stage's loss parts, mean over micro-batches
    metrics = {"main_loss": main}
    if cfg.num_nextn_predict_layers:
        metrics["mtp_loss"] = mtp
    return loss, grads, expert_counts, metrics
