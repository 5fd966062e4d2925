"""The train state and the pure, jitted train step over `nnx.split` state.

One step (V3 Sec. 2.1.2 / 2.2 / 4.2):
  1. forward + backward over `grad_accum` micro-batches (a `lax.scan`), gradients and losses
     weighted by each micro-batch's share of the counted tokens, so the step sees the whole batch;
  2. a step whose loss or gradient norm is non-finite is *skipped*: params, optimizer state and
     routing biases stay as they were, `skipped` counts it;
  3. AdamW update (clip, masked decay) of the `nnx.Param`s;
  4. aux-loss-free balancing: b += gamma * sign(mean load - load) per MoE layer, from expert
     counts summed over the global batch. Under `jit` with a batch sharded over data-parallel
     devices that sum is a global all-reduce, so every replica applies the same update.

The loss is an *objective* `(model, batch) -> (loss, (metrics, moe_stats))`: pretraining's
(`pretrain_objective`: L_main + MTP + balance terms) by default, or a post-training one
(train/objectives_post.py: SFT, DPO, GRPO) passed as `objective=`.

Mixed precision: parameters (master weights) and optimizer state are float32; the model computes
in `ModelConfig.dtype` (bf16 on accelerators), casting weights at each use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import DataConfig
from deepseek_jax.losses import LossConfig, total_loss
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.moe.router import RoutingBias
from deepseek_jax.pipeline_stages import pipelined_value_and_grad, split_microbatches
from deepseek_jax.sharding.parallel import ParallelConfig
from deepseek_jax.sharding.pipeline import PipelineConfig
from deepseek_jax.sharding.rules import batch_sharding, param_shardings
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.optimizer import lr_schedule, make_optimizer, weight_decay_mask
from deepseek_jax.train.schedule import batch_plan
from deepseek_jax.train.trainable import trainable_mask

Batch = dict[str, jax.Array]  # int32 [B, T]: input_ids, labels, loss_mask, segment_ids, positions
# (model, batch) -> (loss, (metrics, moe_stats)); metrics holds scalars, `tokens` among them.
Objective = Callable[[DeepSeekModel, Batch], tuple[jax.Array, tuple[dict, Any]]]
MICROBATCH_WEIGHTS = ("tokens", "rows")


class TrainState(NamedTuple):
    """Everything a step reads and writes (a pytree of arrays; checkpointed as is).

    Attributes:
      step: [] int32 batches consumed, skipped steps included.
      params: `nnx.Param` values (float32 master weights), a pure dict keyed like the model.
      biases: `RoutingBias` values, [L_stack, E] per MoE stack; not seen by the optimizer.
      other: any other model variables (none today), carried unchanged.
      opt_state: the optax state of `RunShapes.optimizer` over `params`.
      rng: [2] uint32 raw key data, read by nothing today; kept because Orbax restores by tree
        structure and existing checkpoints hold it (removing it breaks their restore).
      skipped: [] int32 steps skipped for a non-finite loss or gradient.
    """

    step: jax.Array
    params: dict
    biases: dict
    other: dict
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def _split_model(model: DeepSeekModel):
    graphdef, params, biases, other = nnx.split(model, nnx.Param, RoutingBias, ...)
    return graphdef, params, biases, other


def _create(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: jax.Array):
    model = DeepSeekModel(model_cfg, rngs=nnx.Rngs(jax.random.key(seed)))
    _, params, biases, other = _split_model(model)
    params = nnx.to_pure_dict(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        biases=nnx.to_pure_dict(biases),
        other=nnx.to_pure_dict(other),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
        skipped=jnp.zeros((), jnp.int32),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class RunShapes:
    """A run's model and train state as shapes, built once (`RunShapes.build`, nothing
    allocated) and handed to whatever needs shapes or shardings: init, restore, the step, plan.

    Attributes:
      model_cfg, train_cfg, data: what it was built from.
      model: the abstract `DeepSeekModel` (variables hold ShapeDtypeStructs and their metadata).
      graphdef: of `nnx.split(model, nnx.Param, RoutingBias, ...)`.
      params: the `nnx.Param` variables (types and `logical_axes` metadata kept).
      decay_mask: `weight_decay_mask(params)`, shaped like `state.params`.
      train_mask: `trainable_mask(model, train_cfg.trainable)`, the same shape.
      optimizer: `make_optimizer(train_cfg, data, decay_mask=..., train_mask=...)`.
      state: the TrainState of ShapeDtypeStructs.
    """

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data: DataConfig | None
    model: DeepSeekModel
    graphdef: nnx.GraphDef
    params: nnx.State
    decay_mask: dict
    train_mask: dict
    optimizer: optax.GradientTransformation
    state: TrainState

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        *,
        seed: int = 0,
        data: DataConfig | None = None,
    ) -> RunShapes:
        model = nnx.eval_shape(lambda: DeepSeekModel(model_cfg, rngs=nnx.Rngs(0)))
        graphdef, params, biases, other = _split_model(model)
        decay_mask = weight_decay_mask(params)
        train_mask = trainable_mask(model, train_cfg.trainable)
        optimizer = make_optimizer(train_cfg, data, decay_mask=decay_mask, train_mask=train_mask)
        pure = nnx.to_pure_dict(params)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        state = TrainState(
            step=scalar,
            params=pure,
            biases=nnx.to_pure_dict(biases),
            other=nnx.to_pure_dict(other),
            opt_state=jax.eval_shape(optimizer.init, pure),
            rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(seed + 1))),
            skipped=scalar,
        )
        return cls(
            model_cfg,
            train_cfg,
            data,
            model,
            graphdef,
            params,
            decay_mask,
            train_mask,
            optimizer,
            state,
        )

    def shardings(self, mesh: Mesh, rules: dict) -> TrainState:
        """NamedShardings of every TrainState leaf.

        Params follow their `logical_axes` through `rules` (sharding.rules.param_shardings); the
        optimizer's per-parameter moments follow their parameter (`optax.tree_map_params`);
        routing biases, counters and the RNG are replicated.
        """
        replicated = NamedSharding(mesh, PartitionSpec())
        p_shard = nnx.to_pure_dict(param_shardings(self.params, mesh, rules))
        opt_shard = optax.tree_map_params(
            self.optimizer,
            lambda _, s: s,
            self.state.opt_state,
            p_shard,
            transform_non_params=lambda _: replicated,
        )
        return self.state._replace(
            step=replicated,
            params=p_shard,
            biases=jax.tree.map(lambda _: replicated, self.state.biases),
            other=jax.tree.map(lambda _: replicated, self.state.other),
            opt_state=opt_shard,
            rng=replicated,
            skipped=replicated,
        )


def _shapes_for(shapes: RunShapes | None, model_cfg, train_cfg, **build) -> RunShapes:
    if shapes is None:
        return RunShapes.build(model_cfg, train_cfg, **build)
    if shapes.model_cfg != model_cfg or shapes.train_cfg != train_cfg:
        raise ValueError("shapes= was built for another model or train config than the one given")
    return shapes


def abstract_train_state(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """The graphdef and the train state as ShapeDtypeStructs (nothing allocated)."""
    shapes = RunShapes.build(model_cfg, train_cfg, seed=seed)
    return shapes.graphdef, shapes.state


def train_state_shardings(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    mesh: Mesh,
    rules: dict,
    *,
    shapes: RunShapes | None = None,
):
    """`RunShapes.shardings` of the run's (or a freshly built) RunShapes."""
    return _shapes_for(shapes, model_cfg, train_cfg).shardings(mesh, rules)


def init_train_state(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: dict | None = None,
    shapes: RunShapes | None = None,
) -> tuple[nnx.GraphDef, TrainState]:
    """Creates the model's parameters and optimizer state directly in their final shardings.

    Initialisation runs under `jax.jit` with `out_shardings`, so each device materialises only
    its shard (nothing is built on one host first). Values do not depend on the mesh: the same
    seed gives the same parameters sharded or not.

    Args:
      model_cfg: the architecture.
      train_cfg: supplies the optimizer (its state is created here).
      seed: parameter initialisation seed.
      mesh, rules: the device mesh and logical-axis rules (sharding.rules); None = one device.
      shapes: the run's RunShapes (built here when None).
    Returns:
      (graphdef, state): `nnx.merge(graphdef, state.params, state.biases, state.other)` is the
      model.
    """
    # The seed is an argument, not a constant of the program: every seed of one model and
    # optimizer runs the same compiled initialiser (a sweep over seeds compiles it once, and the
    # persistent compilation cache serves it to later processes).
    seed_array = _seed_array(seed)
    shapes = _shapes_for(shapes, model_cfg, train_cfg, seed=seed)
    out_shardings = None if mesh is None else shapes.shardings(mesh, rules or {})
    optimizer = shapes.optimizer
    create = jax.jit(lambda s: _create(model_cfg, optimizer, s), out_shardings=out_shardings)
    # The initialiser runs once: on CPU, where LLVM optimisation of its many random-number
    # kernels dominates (~2.5x the compile time), compile it unoptimised.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    compiled = create.lower(seed_array).compile(compiler_options=options)
    return shapes.graphdef, compiled(seed_array)


def _seed_array(seed) -> jax.Array:
    """[] int32 `seed`, which `jax.random.key` maps to the key of the Python int itself."""
    if not -(2**31) <= int(seed) < 2**31:
        raise ValueError(f"seed={seed} must fit in int32 (the initialiser takes it as an array)")
    return jnp.asarray(seed, jnp.int32)


def update_biases(
    graphdef: nnx.GraphDef, state: TrainState, counts: jax.Array, gamma: jax.Array
) -> dict:
    """`state.biases` after `DeepSeekModel.apply_bias_update(counts, gamma)`.

    Args:
      graphdef, state: the model (`nnx.merge(graphdef, state.params, state.biases, state.other)`).
      counts: [L, E] expert counts over the global batch in `ModelOutput.moe_stats` row order
        (MoE layers, then MTP layers; without the MTP rows those biases stay as they are).
      gamma: [] update speed.
    Returns:
      The updated biases (the structure of `state.biases`).
    """
    model = nnx.merge(graphdef, state.params, state.biases, state.other)
    model.apply_bias_update(counts, gamma)
    return nnx.to_pure_dict(nnx.state(model, RoutingBias))


def all_finite(tree) -> jax.Array:
    """[] bool: every floating-point leaf of `tree` is free of NaN and inf.

    The per-leaf flags are counted by a dot product, not and-ed together: XLA rewrites a
    reduction over stacked scalars into a chain of `and`s, which XLA:CPU's fusion then copies
    into every fusion that reads the result. In the train step that is each of the per-leaf
    selects of a skipped step (v3-tiny: 69k HLO instructions instead of 20k after optimisation,
    twice the compile time). A dot is computed once and read by all.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    flags = jnp.stack([jnp.isfinite(x).all() for x in leaves]).astype(jnp.float32)
    count = jnp.dot(flags, jnp.ones_like(flags), precision=jax.lax.Precision.HIGHEST)
    return count == len(leaves)  # exact: integers below 2**24


def pretrain_objective(
    model: DeepSeekModel, batch: Batch, *, loss_cfg: LossConfig, mtp_lambda=None
):
    """Pretraining's loss: L_main + lambda/D sum_k L_MTP^k + balance terms + z-loss (V3 Sec. 2).

    Args:
      model: the model.
      batch: int32 [B, T] input_ids, labels and optionally loss_mask, segment_ids, positions.
      loss_cfg: loss weights.
      mtp_lambda: overrides loss_cfg.mtp_lambda (the step's schedule; may be traced).
    Returns:
      (loss, (metrics, moe_stats)).
    """
    out = model(
        batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    loss, metrics = total_loss(out, batch, model.cfg, loss_cfg, mtp_lambda=mtp_lambda)
    return loss, (metrics, out.moe_stats)


def _tokens_per_row(batch: Batch) -> int:
    """T summed over the batch's token rows (`input_ids`, or DPO's chosen_ and rejected_ ones)."""
    return sum(v.shape[1] for k, v in batch.items() if k.endswith("input_ids"))


def _rows(batch: Batch) -> int:
    return next(v.shape[0] for k, v in batch.items() if k.endswith("input_ids"))


def make_train_step(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    graphdef: nnx.GraphDef,
    *,
    mesh: Mesh | None = None,
    rules: dict | None = None,
    parallel: ParallelConfig | None = None,
    donate: bool = True,
    pipeline: PipelineConfig | None = None,
    data: DataConfig | None = None,
    objective: Objective | None = None,
    microbatch_weights: str = "tokens",
    shapes: RunShapes | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted `step(state, batch) -> (state, metrics)`.

    Args:
      model_cfg, loss_cfg, train_cfg: the run's sub-configs (balance-loss weights and the MTP
        lambda from loss_cfg; optimizer, gamma and lambda schedules from train_cfg).
      graphdef: from `init_train_state`.
      mesh, rules: when given, the state is sharded as `train_state_shardings`, the batch as
        `batch_sharding`, and the model runs under `ParallelConfig.create(model_cfg.moe_impl,
        mesh, rules)` (activation constraints, the MoE exchange); None = one device.
      parallel: instead of mesh and rules, the model's ParallelConfig itself (e.g. the planner's
        abstract mesh with a chosen exchange); its mesh and rules then place the state.
      donate: donate the input state's buffers (the caller must not reuse it).
      pipeline: with a schedule and a mesh whose `stage` axis is > 1, loss and gradients come
        from the pipeline executor (deepseek_jax/sharding/pipeline.py) over that axis.
      data: the run's data config: its batch-size ramp turns steps into tokens for the "v3"
        learning rate and the token thresholds (train/schedule.py); None = B x T per step.
      objective: the loss, `(model, batch) -> (loss, (metrics, moe_stats))`; None =
        `pretrain_objective` with loss_cfg and the scheduled MTP lambda. A post-training
        objective's batch may hold [B] arrays (e.g. DPO's reference log-probs); under a mesh every
        leaf is split over the batch axes along its first dimension.
      microbatch_weights: how `grad_accum` micro-batches are weighted: "tokens" (by their
        `loss_mask` sums: exact for a token-mean loss) or "rows" (equally: exact for a mean over
        rows, e.g. DPO or GRPO's per-sequence mean).
      shapes: the run's RunShapes (its decay mask and shardings); built here when None.
    Returns:
      A jitted function. `batch` holds int32 [B, T] `input_ids`, `labels` and optionally
      `loss_mask`, `segment_ids`, `positions`; B must divide by `train_cfg.grad_accum`. Metrics
      are scalars except the per-MoE-layer arrays `expert_load_max`, `expert_load_min` (load of
      the busiest / idlest expert over the mean load) and `dropped` ([L]), and `expert_load`
      ([L, E], each expert's share of its layer's token-expert assignments).
    """
    if microbatch_weights not in MICROBATCH_WEIGHTS:
        raise ValueError(f"{microbatch_weights=} is invalid: allowed {MICROBATCH_WEIGHTS}")
    shapes = _shapes_for(shapes, model_cfg, train_cfg, data=data)
    optimizer = shapes.optimizer
    if shapes.data != data:  # the same masks; the schedule's token boundaries need `data`
        masks = {"decay_mask": shapes.decay_mask, "train_mask": shapes.train_mask}
        optimizer = make_optimizer(train_cfg, data, **masks)
    schedule = lr_schedule(train_cfg, data)
    plan = None if data is None else batch_plan(data)
    accum = train_cfg.grad_accum
    if parallel is None:
        parallel = ParallelConfig.create(model_cfg.moe_impl, mesh, rules)
    elif mesh is not None or rules is not None:
        raise ValueError("make_train_step: give either mesh and rules or parallel, not both")
    else:
        mesh, rules = parallel.mesh, parallel.rules_dict

    def loss_fn(params, biases, other, batch, mtp_lambda):
        model = nnx.merge(graphdef, params, biases, other).replace_parallel(parallel)
        if objective is None:
            return pretrain_objective(model, batch, loss_cfg=loss_cfg, mtp_lambda=mtp_lambda)
        return objective(model, batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def schedules(state: TrainState, tokens_per_step: int):
        seen = state.step.astype(jnp.float32) * float(tokens_per_step)
        if plan is not None:  # the batch-size ramp: tokens of the steps before this one
            seen = plan.tokens_before_jnp(state.step)
        gamma = jnp.float32(train_cfg.bias_update_speed)
        if train_cfg.bias_update_stop_tokens is not None:
            gamma = jnp.where(seen < train_cfg.bias_update_stop_tokens, gamma, 0.0)
        lam = jnp.float32(loss_cfg.mtp_lambda)
        if train_cfg.mtp_lambda_switch_tokens is not None and train_cfg.mtp_lambda_late is not None:
            lam = jnp.where(
                seen < train_cfg.mtp_lambda_switch_tokens, lam, train_cfg.mtp_lambda_late
            )
        return gamma, lam

    pipe = None
    if pipeline is not None and mesh is not None and mesh.shape.get("stage", 1) > 1:
        if objective is not None:
            raise ValueError("the pipeline executor runs the pretraining objective only")
        pipe = pipeline.build(mesh.shape["stage"])

    def pipelined(state: TrainState, batch: Batch, lam):
        model = nnx.merge(graphdef, state.params, state.biases, state.other)
        loss, grads, counts, metrics = pipelined_value_and_grad(
            model, batch, pipe, mesh, loss_cfg, lam
        )
        grads = jax.tree.map(lambda p, g: g.astype(p.dtype), state.params, nnx.to_pure_dict(grads))
        # The pipeline runs dropless (a dense model has no counts at all).
        dropped = None if counts is None else jnp.zeros((counts.shape[0],), jnp.float32)
        return loss, grads, metrics, counts, dropped

    def grads_and_metrics(state: TrainState, batch: Batch, lam):
        if pipe is not None:
            return pipelined(state, batch, lam)
        args = (state.params, state.biases, state.other)
        if accum == 1:
            (loss, (metrics, stats)), grads = grad_fn(*args, batch, lam)
            counts = None if stats is None else stats.expert_counts.sum(1)  # [L, E]
            dropped = None if stats is None else stats.dropped
            return loss, grads, metrics, counts, dropped
        micro = split_microbatches(batch, accum)  # [A, B/A, T]
        if microbatch_weights == "rows":
            weights = jnp.full((accum,), 1.0 / accum, jnp.float32)
        else:
            mask = micro.get("loss_mask", jnp.ones_like(micro["labels"]))
            ntok = mask.reshape(accum, -1).sum(-1).astype(jnp.float32)  # [A]
            weights = ntok / jnp.maximum(ntok.sum(), 1.0)  # exact token mean for the main loss

        def body(g_acc, xs):
            mb, w = xs
            (loss, (metrics, stats)), g = grad_fn(*args, mb, lam)
            g_acc = jax.tree.map(lambda a, b: a + w * b, g_acc, g)
            metrics = {k: v if k == "tokens" else w * v for k, v in metrics.items()}
            extra = None if stats is None else (stats.expert_counts.sum(1), stats.dropped)
            return g_acc, (w * loss, metrics, extra)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, metrics, extra) = jax.lax.scan(body, zeros, (micro, weights))
        metrics = jax.tree.map(lambda m: m.sum(0), metrics)
        counts = dropped = None
        if extra is not None:
            counts, dropped = extra[0].sum(0), extra[1].mean(0)  # [L, E], [L]
        return losses.sum(), grads, metrics, counts, dropped

    def step(state: TrainState, batch: Batch):
        gamma, lam = schedules(state, _rows(batch) * _tokens_per_row(batch))
        loss, grads, metrics, counts, dropped = grads_and_metrics(state, batch, lam)
        grad_norm = optax.tree.norm(grads)
        lr = schedule(state.step - state.skipped)  # optax's count = applied updates
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The new state too: e.g. lr=nan with finite gradients.
        finite = all_finite((loss, grad_norm, params, opt_state))
        biases = state.biases
        if counts is not None and jax.tree.leaves(biases):
            biases = update_biases(graphdef, state, counts, gamma)

        def keep(new, old):  # a non-finite step leaves everything as it was
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            biases=keep(biases, state.biases),
            other=state.other,
            opt_state=keep(opt_state, state.opt_state),
            rng=state.rng,
            skipped=skipped,
        )
        out = dict(metrics)
        out.update(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            bias_update_speed=gamma,
            mtp_lambda=lam,
            finite=finite.astype(jnp.float32),
            skipped=skipped,
        )
        if counts is not None:
            mean = jnp.maximum(counts.mean(-1), 1e-9)  # [L]
            out["expert_load_max"] = counts.max(-1) / mean
            out["expert_load_min"] = counts.min(-1) / mean
            out["dropped"] = dropped
            # [L, E] share of each layer's (token, expert) assignments: the report's heatmap
            out["expert_load"] = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1e-9)
        return new_state, out

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    else:
        shardings = shapes.shardings(mesh, rules or {})
        # The pretraining batch is all [B, T]; another objective's may mix ranks, so its leaves
        # are placed one by one (`place_batch`) and jit takes their shardings as they come.
        batch_in = batch_sharding(mesh, rules or {}) if objective is None else None
        jitted = jax.jit(
            step,
            in_shardings=(shardings, batch_in),
            out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=(0,) if donate else (),
        )
    if objective is None or mesh is None:
        return jitted
    return _PlacedStep(jitted, mesh, rules)


def place_batch(batch: Batch, mesh: Mesh | None, rules: dict | None) -> Batch:
    """Puts every leaf of a batch on `mesh`, its first (row) axis over the rules' batch axes."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    spec = batch_sharding(mesh, rules or {}).spec
    return {
        k: jax.device_put(v, NamedSharding(mesh, PartitionSpec(spec[0], *[None] * (v.ndim - 1))))
        for k, v in batch.items()
    }


class _PlacedStep:
    """A post-training step: puts the batch's leaves (of mixed ranks) on the mesh, then runs the
    jitted step (`place_batch`), so callers may pass host arrays."""

    def __init__(self, jitted, mesh: Mesh, rules: dict | None):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, state, batch):
        return self.jitted(state, place_batch(batch, self.mesh, self.rules))

    def lower(self, state, batch):
        return self.jitted.lower(state, place_batch(batch, self.mesh, self.rules))
