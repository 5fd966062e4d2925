"""Post-training runs: SFT, DPO and GRPO through the one train step (`train.task`).

`run_post(cfg, run_dir, ckpt_dir)` is what `train_main.py` runs when `train.task` is not
"pretrain" (the folder locking, config checks and signal handling stay in train/loop.py):
  1. the starting weights: `train.init_from` (hub folder, Orbax checkpoint or run folder), else a
     random initialisation; the run's own newest checkpoint wins when there is one (resume);
  2. the reference model for DPO / GRPO: a frozen copy of the starting parameters (same
     shardings as the policy), whose log-probs are computed without gradients;
  3. the data of `post.data` through data/chat.py: packed SFT rows, DPO pairs, GRPO prompts;
  4. per step, a batch (GRPO: every `post.mu` steps a rollout batch of `data.global_batch_size`
     completions sampled by the generation engine from the current policy, scored by the reward
     functions, group advantages; the engine's log-probs are the old log-probs), then the shared
     jitted train step with the task's objective (train/objectives_post.py);
  5. metrics.jsonl + TensorBoard (MetricsLogger) and Orbax checkpoints as in pretraining.

The MoE routing-bias update follows `post.update_routing_bias` (frozen by default for DPO and
GRPO: gamma = 0); the routing statistics are logged either way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.data import load_tokenizer
from deepseek_jax.data.chat import (
    JinjaChatTemplate,
    SimpleChatTemplate,
    _pad_rows,
    load_dpo,
    load_prompts,
    load_sft,
    pack_examples,
)
from deepseek_jax.data.rollouts import rollout_batch
from deepseek_jax.inference.engine import generate
from deepseek_jax.resources import data_path
from deepseek_jax.rewards import RewardFn, accuracy_reward, format_reward, score
from deepseek_jax.rl import group_advantages
from deepseek_jax.sharding.mesh import make_mesh
from deepseek_jax.sharding.parallel import ParallelConfig
from deepseek_jax.sharding.rules import get_rules
from deepseek_jax.train.config import RunConfig
from deepseek_jax.train.loop import check_vocab, open_run
from deepseek_jax.train.metrics import MetricsLogger
from deepseek_jax.train.objectives_post import (
    dpo_objective,
    dpo_reference,
    grpo_objective,
    grpo_reference,
    sft_objective,
)
from deepseek_jax.train.post_config import PostConfig
from deepseek_jax.train.step import (
    RunShapes,
    TrainState,
    _split_model,
    init_train_state,
    make_train_step,
    place_batch,
)

REWARD_FNS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- starting weights -----------------------------------------------------------------------
def load_init(path: str):
    """The model stored at `path`: a `train_main.py` run folder, a hub folder or an Orbax one."""
    from deepseek_jax.inference.cli import is_run_dir, load_run

    if not os.path.isdir(path):
        raise FileNotFoundError(f"train.init_from={path!r} is not a folder")
    if is_run_dir(path):
        return load_run(path)[0]
    from deepseek_jax.pretrained import load_pretrained

    return load_pretrained(path, dtype=jnp.float32)


def resolve_init(cfg: RunConfig):
    """(cfg, model or None): with `train.init_from`, cfg.model becomes the checkpoint's config
    (keeping this run's remat, scan_layers, moe_impl and capacity_factor) and the loaded model
    comes along."""
    if cfg.train.init_from is None:
        return cfg, None
    model = load_init(cfg.train.init_from)
    m = cfg.model
    model_cfg = model.cfg.replace(
        remat=m.remat,
        scan_layers=m.scan_layers,
        moe_impl=m.moe_impl,
        capacity_factor=m.capacity_factor,
    )
    return dataclasses.replace(cfg, model=model_cfg), model


def state_from_model(
    model, cfg: RunConfig, mesh=None, rules=None, shapes: RunShapes | None = None
) -> tuple[Any, TrainState]:
    """(graphdef, TrainState at step 0) holding `model`'s weights, in the run's shardings."""
    if shapes is None:
        shapes = RunShapes.build(cfg.model, cfg.train, seed=cfg.train.seed)
    abstract = shapes.state
    _, params, biases, other = _split_model(model)
    params, biases, other = (nnx.to_pure_dict(x) for x in (params, biases, other))
    want = jax.tree.structure(abstract.params)
    if jax.tree.structure(params) != want:
        raise ValueError(
            f"train.init_from={cfg.train.init_from!r}: its parameters do not match the "
            "structure of the model its config describes"
        )
    # Copies (jnp.array copies): the train step donates its state, the model keeps its weights.
    params = jax.tree.map(lambda a, x: jnp.array(x, a.dtype), abstract.params, params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        biases=jax.tree.map(jnp.array, biases),
        other=jax.tree.map(jnp.array, other),
        opt_state=shapes.optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
        skipped=jnp.zeros((), jnp.int32),
    )
    if mesh is not None:
        state = jax.device_put(state, shapes.shardings(mesh, rules))
    return shapes.graphdef, state


# ---- data -----------------------------------------------------------------------------------
def chat_template(cfg: RunConfig):
    if cfg.post.chat_template is not None:
        return JinjaChatTemplate.from_folder(cfg.post.chat_template)
    return SimpleChatTemplate(load_tokenizer(cfg.data.tokenizer))


class RowStream:
    """Batches of `batch` rows of fixed arrays [N, ...], reshuffled every epoch from `seed`.

    The state is (epoch, index) of the next row: a restored stream continues where it stopped.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch: int, *, seed: int, shuffle: bool):
        self.arrays, self.batch, self.seed, self.shuffle = dict(arrays), batch, seed, shuffle
        self.n = len(next(iter(self.arrays.values())))
        self.epoch = self.index = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> np.ndarray:
        out = []
        while len(out) < self.batch:
            order = self._order(self.epoch)
            take = min(self.batch - len(out), self.n - self.index)
            out.extend(order[self.index : self.index + take])
            self.index += take
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(out)

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self.next_indices()
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def sft_rows(cfg: RunConfig, template) -> dict[str, np.ndarray]:
    examples = load_sft(data_path(cfg.post.data), template, seq_len=cfg.data.seq_len)
    if cfg.post.pack:
        return pack_examples(examples, seq_len=cfg.data.seq_len, pad_id=template.pad_id)
    return _pad_rows(examples, cfg.data.seq_len, template.pad_id)


# ---- GRPO rollouts --------------------------------------------------------------------------
def reward_functions(post: PostConfig, extra: Mapping[str, RewardFn] | None = None):
    """(name -> callable, name -> weight) of `post.rewards`, plus any extra callables (weight 1)."""
    fns = {name: REWARD_FNS[name] for name in post.rewards}
    weights = dict(zip(post.rewards, post.reward_weights, strict=True))
    for name, fn in (extra or {}).items():
        fns[name], weights[name] = fn, weights.get(name, 1.0)
    return fns, weights


def grpo_rollouts(
    model,
    records: list[dict],
    template,
    post: PostConfig,
    *,
    seq_len: int,
    seed: int,
    reward_fns: Mapping[str, RewardFn],
    reward_weights: Mapping[str, float] | None = None,
    mesh=None,
    rules=None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """G = post.group_size completions per prompt record, scored, as a GRPO batch.

    Args:
      model: the current policy (a DeepSeekModel).
      records: prompt records of `load_prompts` (with `prompt_ids` and `answer`).
      template: the chat template (its eos ends a completion, its decode feeds the rewards).
      post: sampling, advantage and group settings.
      seq_len: T of the batch rows.
      seed: the sampling seed of this rollout batch.
      reward_fns, reward_weights: name -> callable `fn(completion, record) -> float`, weight.
      mesh, rules: shard the generation batch (None = one device).
    Returns:
      (batch of `data.rollouts.rollout_batch` [N = len(records) x G rows], host metrics:
      reward_mean / reward_std, reward/<name>_mean and _std, completion_length, stop_fraction).
    """
    G = post.group_size
    prompts = [r["prompt_ids"] for r in records for _ in range(G)]
    examples = [r for r in records for _ in range(G)]
    res = generate(
        model,
        prompts,
        max_new_tokens=post.max_new_tokens,
        temperature=post.temperature,
        top_k=post.top_k,
        top_p=post.top_p,
        stop_token_ids=[template.eos_id],
        seed=seed,
        mesh=mesh,
        rules=rules,
    )
    texts = [
        template.decode(t[:-1] if f == "stop" else t)
        for t, f in zip(res.tokens, res.finish_reasons, strict=True)
    ]
    total, per_fn = score(texts, examples, reward_fns, reward_weights)
    adv = np.asarray(group_advantages(total, G, scale=post.advantage_scale))
    batch = rollout_batch(
        prompts, res.tokens, res.logprobs, adv, seq_len=seq_len, pad_id=template.pad_id
    )
    metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std())}
    for name, v in per_fn.items():
        metrics[f"reward/{name}_mean"] = float(v.mean())
        metrics[f"reward/{name}_std"] = float(v.std())
    metrics["completion_length"] = float(np.mean([len(t) for t in res.tokens]))
    metrics["stop_fraction"] = float(np.mean([f == "stop" for f in res.finish_reasons]))
    return batch, metrics


# ---- the tasks ------------------------------------------------------------------------------
def objective_for(cfg: RunConfig) -> tuple[Callable, str]:
    """(objective, micro-batch weighting) of `train.task`."""
    post, task = cfg.post, cfg.train.task
    if task == "sft":
        return functools.partial(sft_objective, loss_cfg=cfg.loss), "tokens"
    if task == "dpo":
        obj = functools.partial(
            dpo_objective, beta=post.dpo_beta, loss_cfg=cfg.loss, chunk_size=post.chunk_size
        )
        return obj, "rows"
    obj = functools.partial(
        grpo_objective,
        beta=post.beta,
        epsilon=post.epsilon,
        epsilon_high=post.epsilon_high,
        loss_type=post.loss_type,
        max_completion_length=post.max_new_tokens,
        loss_cfg=cfg.loss,
        chunk_size=post.chunk_size,
    )
    return obj, "tokens" if post.loss_type in ("bnpo", "dapo") else "rows"


class Reference:
    """The frozen reference policy: a copy of some parameters and a jitted log-prob pass."""

    def __init__(self, graphdef, state: TrainState, fn, parallel: ParallelConfig):
        self.graphdef = graphdef
        self.reset(state)

        def apply(params, biases, other, batch):
            model = nnx.merge(graphdef, params, biases, other).replace_parallel(parallel)
            return fn(model, batch)

        self._apply = jax.jit(apply)

    def reset(self, state: TrainState) -> None:
        """The reference becomes (a copy of) the policy of `state` (copied: the step donates)."""
        self.params, self.biases, self.other = jax.tree.map(
            jnp.copy, (state.params, state.biases, state.other)
        )

    def __call__(self, batch: dict) -> dict:
        return self._apply(self.params, self.biases, self.other, batch)


class Task:
    """Makes each step's batch (and host metrics); its `get_state` goes into the checkpoint."""

    def __init__(self, cfg: RunConfig, graphdef, state: TrainState, mesh, rules, reward_fns=None):
        self.cfg, self.graphdef, self.mesh, self.rules = cfg, graphdef, mesh, rules
        self.parallel = ParallelConfig.create(cfg.model.moe_impl, mesh, rules)
        self.template = chat_template(cfg)
        task, B, seed = cfg.train.task, cfg.data.global_batch_size, cfg.train.seed
        self.reference = None
        if task == "sft":
            self.stream = RowStream(sft_rows(cfg, self.template), B, seed=seed, shuffle=True)
        elif task == "dpo":
            pairs = load_dpo(data_path(cfg.post.data), self.template, seq_len=cfg.data.seq_len)
            self.stream = RowStream(pairs, B, seed=seed, shuffle=True)
            ref = functools.partial(dpo_reference, chunk_size=cfg.post.chunk_size)
            self.reference = Reference(graphdef, state, ref, self.parallel)
        else:
            self.records = load_prompts(data_path(cfg.post.data), self.template)
            index = {"record": np.arange(len(self.records))}
            self.stream = RowStream(index, B // cfg.post.group_size, seed=seed, shuffle=True)
            self.reward_fns, self.reward_weights = reward_functions(cfg.post, reward_fns)
            if cfg.post.beta > 0:
                ref = functools.partial(grpo_reference, chunk_size=cfg.post.chunk_size)
                self.reference = Reference(graphdef, state, ref, self.parallel)
            self.rollout: dict | None = None
            self.rollout_metrics: dict[str, float] = {}

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state)

    def next_batch(self, state: TrainState, step: int) -> tuple[dict, dict[str, float]]:
        """The batch of step `step` (0-based: the steps done so far) for the policy `state`."""
        task = self.cfg.train.task
        if task == "sft":
            return place_batch(next(self.stream), self.mesh, self.rules), {}
        if task == "dpo":
            batch = place_batch(next(self.stream), self.mesh, self.rules)
            return {**batch, **self.reference(batch)}, {}
        post = self.cfg.post
        extra = {}
        if self.reference is not None and post.ref_reset_every and step > 0:
            if step % post.ref_reset_every == 0:
                self.reference.reset(state)
                extra["ref_reset"] = 1.0
        if self.rollout is None or step % post.mu == 0:
            t0 = time.perf_counter()
            model = nnx.merge(self.graphdef, state.params, state.biases, state.other)
            records = [self.records[i] for i in self.stream.next_indices()]
            mesh = self.mesh if self.mesh is not None and self.mesh.size > 1 else None
            batch, metrics = grpo_rollouts(
                model,
                records,
                self.template,
                post,
                seq_len=self.cfg.data.seq_len,
                seed=self.cfg.train.seed * 1_000_003 + step,
                reward_fns=self.reward_fns,
                reward_weights=self.reward_weights,
                mesh=mesh,
                rules=self.rules if mesh is not None else None,
            )
            batch = place_batch(batch, self.mesh, self.rules)
            if self.reference is not None:
                batch.update(self.reference(batch))
            self.rollout, self.rollout_metrics = batch, metrics
            extra["rollout_s"] = time.perf_counter() - t0
        else:  # an inner update on the last rollout batch
            extra["rollout_s"] = 0.0
        return self.rollout, {**self.rollout_metrics, **extra}


def _log_line(step: int, r: dict[str, Any]) -> str:
    parts = [f"step {step:>6d}", f"loss {r['loss']:.4f}"]
    for key, fmt in (
        ("main_loss", ".4f"),
        ("reward_margin", ".3f"),
        ("reward_accuracy", ".2f"),
        ("reward_mean", ".3f"),
        ("kl", ".4f"),
        ("clip_fraction", ".3f"),
        ("completion_length", ".1f"),
        ("rollout_s", ".2f"),
        ("update_s", ".2f"),
    ):
        if key in r:
            parts.append(f"{key} {r[key]:{fmt}}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}"]
    if "expert_load_max_mean" in r:
        parts.append(f"load max/mean {r['expert_load_max_mean']:.2f}")
    return " | ".join(parts)


def run_post(
    cfg: RunConfig,
    run_dir: str,
    ckpt_dir: str,
    *,
    on_step: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
    signals=None,
    reward_fns: Mapping[str, RewardFn] | None = None,
) -> dict[str, Any]:
    """Runs `cfg.train.task` (sft, dpo or grpo); returns the MetricsLogger summary + history.

    Args:
      cfg: the run config (train.task != "pretrain").
      run_dir, ckpt_dir: output and checkpoint folders (already locked by the caller).
      on_step: called with the step number after every step.
      allow_config_change: see train.loop.run.
      signals: a `loop.StopSignals` (entered by the caller) whose request stops the run.
      reward_fns: extra GRPO reward callables `fn(completion, record) -> float` (weight 1 unless
        post.reward_weights names them).
    """
    if jax.process_count() > 1:
        raise NotImplementedError(
            f"train.task={cfg.train.task!r} runs in one process (any number of local devices)"
        )
    cfg, init_model = resolve_init(cfg)
    tcfg = cfg.train
    check_vocab(cfg)
    if not cfg.post.routing_bias_updates(tcfg.task):
        tcfg = dataclasses.replace(tcfg, bias_update_speed=0.0)
    mesh, rules = make_mesh(cfg.mesh), get_rules(cfg.mesh.rules)
    ckpt, stored = open_run(cfg, run_dir, ckpt_dir, allow_config_change)
    # One abstract model and optimizer for the run (init, restore, step); its optimizer state
    # does not depend on the bias-update speed that `tcfg` may have zeroed.
    shapes = RunShapes.build(cfg.model, tcfg, seed=tcfg.seed, data=cfg.data)
    if init_model is not None:
        graphdef, state = state_from_model(init_model, cfg, mesh, rules, shapes=shapes)
        del init_model
        _say(f"{tcfg.task}: starting from {tcfg.init_from}")
    else:
        graphdef, state = init_train_state(
            cfg.model, tcfg, seed=tcfg.seed, mesh=mesh, rules=rules, shapes=shapes
        )
    task = Task(cfg, graphdef, state, mesh, rules, reward_fns)  # the reference = these weights
    start = 0
    if stored is not None:
        abstract, shardings = shapes.state, shapes.shardings(mesh, rules)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        restored = ckpt.restore(target._asdict())
        if restored is not None:
            start, state_dict, data_state = restored
            state = TrainState(**state_dict)
            task.set_state(data_state)
            _say(f"resumed from step {start} ({ckpt.directory})")
    objective, weights = objective_for(cfg)
    step_fn = make_train_step(
        cfg.model,
        cfg.loss,
        tcfg,
        graphdef,
        mesh=mesh,
        rules=rules,
        data=cfg.data,
        objective=objective,
        microbatch_weights=weights,
        shapes=shapes,
    )
    logger = MetricsLogger(
        run_dir,
        total_steps=tcfg.steps,
        start_step=start,
        tensorboard=tcfg.tensorboard,
        progress=tcfg.progress,
    )
    step, saved = start, start if start else -1
    try:
        while step < tcfg.steps:
            batch, extra = task.next_batch(state, step)
            real = sum(int((v > 0).sum()) for k, v in batch.items() if k.endswith("segment_ids"))
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
            update_s = time.perf_counter() - t0
            step += 1
            logger.advance(step)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                host = {k: np.asarray(v) for k, v in metrics.items()}
                host.update(extra, update_s=update_s, tokens_per_s=real / update_s)
                record = logger.log(step, host)
                line = _log_line(step, record)
                if tcfg.progress:
                    from tqdm import tqdm

                    tqdm.write(line, file=sys.stderr)
                else:
                    _say(line)
            if on_step is not None:
                on_step(step)
            stop = signals is not None and signals.requested()
            if ckpt.should_save(step) or stop:
                ckpt.save(
                    step, state._asdict(), json.loads(json.dumps(task.get_state())), wait=stop
                )
                saved = step
            if stop:
                break
        if cfg.checkpoint.save_final and saved != step:
            ckpt.save(step, state._asdict(), json.loads(json.dumps(task.get_state())))
    finally:
        ckpt.close()
        summary = logger.close()
    summary["history"] = logger.history
    summary["finished"] = step >= tcfg.steps
    return summary
