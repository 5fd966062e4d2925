"""Plans a sharded training run without devices: memory per device and collective volume.

    python -m deepseek_jax.plan --config configs/deepseek-v3-671b.yaml \\
        --mesh fsdp=32,expert=64 --rules fsdp_ep --seq 4096
    python -m deepseek_jax.plan --scaling 1e21   # DeepSeek LLM's scaling laws (scaling.py)

The train step (`deepseek_jax.train.step.make_train_step`) is traced and lowered for the target
platform on an `AbstractMesh` (e.g. 2048 devices) with abstract, sharded inputs: nothing is
allocated and no device is needed. What is reported, and where each number comes from:

  * parameter, gradient and optimizer bytes per device - from the shardings the rules give
    every leaf of the train state (exact);
  * collectives written in the program (the expert-parallel all-to-alls, the FSDP gathers and
    reduce-scatters of expert weights, their psums) - traced: walked in the step's jaxpr with
    their per-device shapes, times the trip counts of the layer scans (exact for the program);
  * collectives the SPMD partitioner inserts at compile time (FSDP gathers of the other weights,
    gradient reductions, tensor-parallel all-reduces) - analytic, from the shardings;
  * activations - an analytic estimate (saved layer inputs, logits, one layer's working set).

A `stage` axis (pipeline parallelism) is planned analytically: the step is lowered on the
per-stage mesh (the other axes) and per-device numbers are those of the heaviest stage holding
ceil(L / PP) layers, with PP + 1 micro-batches in flight (DualPipe, V3 Table 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax import scaling
from deepseek_jax.config import ModelConfig, load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.moe import ep_plan, expert_parallel
from deepseek_jax.params import count_params
from deepseek_jax.sharding.mesh import AXES, MeshConfig, abstract_mesh
from deepseek_jax.sharding.parallel import Exchange, ParallelConfig, splits_tokens_or_experts
from deepseek_jax.sharding.rules import DEFAULT_RULES, batch_sharding, get_rules
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import RunShapes, make_train_step

GiB = 1024**3
# jaxpr primitive -> reported kind. Operand bytes are per device (shapes inside shard_map).
_KINDS = {
    "all_to_all": "all_to_all",
    "ragged_all_to_all": "ragged_all_to_all",
    "all_gather": "all_gather",
    "all_gather_invariant": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "psum": "all_reduce",
    "psum_invariant": "all_reduce",
    "ppermute": "send_recv",
}


@dataclasses.dataclass
class Collective:
    """Per-step totals of one kind of collective on one device."""

    count: int = 0
    operand_bytes: float = 0.0  # sum of per-device operand sizes
    wire_bytes: float = 0.0  # bytes each device sends (ring algorithms; see `_wire_factor`)
    source: str = "traced"


def _aval_bytes(aval) -> int:
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize


def _group_size(params: Mapping, mesh_shape: Mapping[str, int]) -> int:
    axes = params.get("axes", params.get("axis_name", ()))
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh_shape.get(a, 1) for a in axes)


def _wire_factor(kind: str, n: int) -> float:
    """Bytes a device sends per operand byte in a group of n (ring all-gather / reduce-scatter)."""
    if n <= 1:
        return 0.0
    return {
        "all_to_all": (n - 1) / n,
        "ragged_all_to_all": (n - 1) / n,  # on average: the local share stays put
        "all_gather": n - 1,  # the operand is the local shard
        "reduce_scatter": (n - 1) / n,
        "all_reduce": 2 * (n - 1) / n,
        "send_recv": 1.0,
    }[kind]


def _sub_jaxprs(params: Mapping):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def collectives_from_jaxpr(jaxpr, mesh_shape: Mapping[str, int]) -> dict[str, Collective]:
    """Totals the collectives of a (closed) jaxpr per device, scans times their length.

    A `ragged_all_to_all` counts min(operand, output) rows: a device sends (and receives back)
    exactly its own assignments however large the receive buffer is. A `while` loop counts once
    (its trip count is not static); `cond` counts its costliest branch.
    """
    out: dict[str, Collective] = {}

    def walk(j, times: int):
        for eqn in j.eqns:
            name = eqn.primitive.name
            if name in _KINDS:
                kind = _KINDS[name]
                sizes = [_aval_bytes(v.aval) for v in eqn.invars if hasattr(v.aval, "shape")]
                nbytes = min(sizes[:2]) if kind == "ragged_all_to_all" else sum(sizes)
                n = _group_size(eqn.params, mesh_shape)
                if n <= 1:  # over mesh axes of size 1: a no-op
                    continue
                c = out.setdefault(kind, Collective())
                c.count += times
                c.operand_bytes += times * nbytes
                c.wire_bytes += times * nbytes * _wire_factor(kind, n)
            if name == "cond":
                branches = [
                    collectives_from_jaxpr(b.jaxpr, mesh_shape) for b in eqn.params["branches"]
                ]
                best = max(branches, key=lambda d: sum(c.wire_bytes for c in d.values()))
                for kind, c in best.items():
                    acc = out.setdefault(kind, Collective())
                    acc.count += times * c.count
                    acc.operand_bytes += times * c.operand_bytes
                    acc.wire_bytes += times * c.wire_bytes
                continue
            inner = times * (eqn.params["length"] if name == "scan" else 1)
            for sub in _sub_jaxprs(eqn.params):
                walk(sub, inner)

    walk(getattr(jaxpr, "jaxpr", jaxpr), 1)
    return out


_HLO_OPS = {
    "stablehlo.all_to_all": "all_to_all",
    "@ragged_all_to_all": "ragged_all_to_all",
    "stablehlo.all_gather": "all_gather",
    "stablehlo.reduce_scatter": "reduce_scatter",
    "stablehlo.all_reduce": "all_reduce",
}


def collectives_from_stablehlo(text: str) -> dict[str, Collective]:
    """Counts collectives in lowered StableHLO text by op, with their first operand's bytes.

    Loops are not unrolled (each op counts once), so this is for loop-free programs; it
    cross-checks `collectives_from_jaxpr` in the tests.
    """
    import re

    bits = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "f64": 8, "i64": 8, "i8": 1}
    out: dict[str, Collective] = {}
    for line in text.splitlines():
        op = next((k for k in _HLO_OPS if k in line), None)
        if op is None or " : (" not in line:
            continue
        m = re.search(r"tensor<([0-9x]*)x?([a-z]+[0-9]+)>", line.split(" : (", 1)[1])
        if m is None:
            continue
        dims = [int(d) for d in m.group(1).split("x") if d]
        c = out.setdefault(_HLO_OPS[op], Collective())
        c.count += 1
        c.operand_bytes += math.prod(dims) * bits.get(m.group(2), 4)
    return out


# ---- bytes from shardings -------------------------------------------------------------------
def local_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, mesh_shape) -> int:
    """Bytes of one device's shard of an array of `shape` sharded by `spec`."""
    n = 1
    for entry in spec:
        for a in () if entry is None else (entry,) if isinstance(entry, str) else entry:
            n *= mesh_shape[a]
    return math.prod(shape) * jnp.dtype(dtype).itemsize // n


def _tree_local_bytes(tree, shardings, mesh_shape) -> int:
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(
        local_bytes(x.shape, x.dtype, s.spec, mesh_shape)
        for x, s in zip(leaves, shards, strict=True)
    )


@dataclasses.dataclass
class Plan:
    """Per-device memory (bytes) and per-step collectives of one configuration."""

    config: str
    mesh: dict[str, int]
    rules: str
    batch: int
    seq: int
    exchange: str
    buffer_factor: float | None
    platform: str
    params_total: int
    params_activated: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    activation_note: str
    collectives: dict[str, Collective]
    lower_seconds: float
    hlo_chars: int
    stage_note: str = ""
    # dropless ragged EP: mean (token, device) pairs per token (rows the dispatch sends) for the
    # router over random logits; None where the exchange sends one row per kept assignment
    dispatch_pairs: float | None = None
    experts_per_token: int = 0

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def _flat(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _in_shard_map(path: str, spec_axes: tuple) -> bool:
    """Weights the EP shard_map gathers and reduces itself (traced, not analytic)."""
    return "experts" in spec_axes or path.endswith("ffn/router/weight")


def _analytic_collectives(
    cfg: ModelConfig, params, logical, shardings, mesh_shape, rules, B_l: int, T: int
) -> dict[str, Collective]:
    """FSDP gathers, gradient reductions and TP all-reduces the partitioner will insert."""
    batch_axes = set(_flat(rules.get("batch")))
    out = {
        "fsdp all-gather (dense weights)": Collective(source="analytic"),
        "grad reduce-scatter (dense)": Collective(source="analytic"),
        "grad all-reduce (replicated)": Collective(source="analytic"),
        "tensor-parallel all-reduce": Collective(source="analytic"),
    }
    flat = jax.tree_util.tree_leaves_with_path(params)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, x), sh in zip(flat, shards, strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if _in_shard_map(name, logical[name]):
            continue
        used = [a for e in sh.spec for a in _flat(e)]
        gathered = [a for a in used if a in batch_axes]  # FSDP: gathered for use
        n_g = math.prod(mesh_shape[a] for a in gathered)
        replicated = [a for a in batch_axes if a in mesh_shape and a not in used]
        n_r = math.prod(mesh_shape[a] for a in replicated)
        shard = local_bytes(x.shape, x.dtype, sh.spec, mesh_shape)
        if n_g > 1:  # forward, then again for the backward (the recomputed layer)
            c = out["fsdp all-gather (dense weights)"]
            c.count += 2
            c.operand_bytes += 2 * shard
            c.wire_bytes += 2 * shard * (n_g - 1)
            c = out["grad reduce-scatter (dense)"]
            c.count += 1
            c.operand_bytes += shard * n_g
            c.wire_bytes += shard * (n_g - 1)
        if n_r > 1:
            c = out["grad all-reduce (replicated)"]
            c.count += 1
            c.operand_bytes += shard
            c.wire_bytes += shard * 2 * (n_r - 1) / n_r
    tp = math.prod(mesh_shape[a] for a in _flat(rules.get("heads")))
    if tp > 1:  # Megatron: 2 forward + 2 backward per layer, +2 for the recomputed forward
        per = (4 + (2 if cfg.remat != "none" else 0)) * B_l * T * cfg.hidden_size
        per *= jnp.dtype(cfg.compute_dtype).itemsize
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers + 1  # + embedding/head
        c = out["tensor-parallel all-reduce"]
        c.count = layers * (6 if cfg.remat != "none" else 4)
        c.operand_bytes = layers * per
        c.wire_bytes = layers * per * 2 * (tp - 1) / tp
    return {k: v for k, v in out.items() if v.count}


def _activation_estimate(cfg: ModelConfig, mesh_shape, rules, B_l, T, tokens_buffer) -> float:
    """Saved layer inputs + logits (and their gradient) + one layer's peak working set."""
    b = jnp.dtype(cfg.compute_dtype).itemsize
    D = cfg.hidden_size
    tp_heads = math.prod(mesh_shape[a] for a in _flat(rules.get("heads")))
    tp_vocab = math.prod(mesh_shape[a] for a in _flat(rules.get("vocab")))
    tp_ffn = math.prod(mesh_shape[a] for a in _flat(rules.get("expert_mlp")))
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    saved = layers * B_l * T * D * b
    logits = (1 + cfg.num_nextn_predict_layers) * B_l * T * (cfg.vocab_size // tp_vocab) * 4 * 2
    heads = cfg.num_attention_heads // tp_heads
    d_qk = cfg.qk_head_dim if cfg.attention_type == "mla" else cfg.attn_head_dim
    attn = 2 * B_l * heads * T * T * 4 + 4 * B_l * T * heads * d_qk * b
    moe = 0
    if cfg.is_moe:
        F_l = cfg.moe_intermediate_size // tp_ffn
        moe = 2 * tokens_buffer * (2 * D + 3 * F_l) * b
    return saved + logits + max(attn, moe)


def plan(
    cfg: ModelConfig,
    mesh_sizes: Mapping[str, int],
    rules_name: str,
    *,
    batch: int | None = None,
    seq: int = 4096,
    exchange: Exchange = "ragged",
    buffer_factor: float | None = 2.0,
    platform: str = "cuda",
    train_cfg: TrainConfig | None = None,
    config_name: str = "",
) -> Plan:
    """Lowers the train step on an abstract mesh and returns the per-device plan.

    Args:
      cfg: the model; mesh_sizes: axis -> size (axes of `sharding.mesh.AXES`, missing = 1).
      rules_name: a preset of sharding.rules.RULE_PRESETS.
      batch: global sequences per step (per micro-batch under PP); default one per batch shard.
      seq: tokens per sequence.
      exchange: the expert-parallel exchange ('ragged', 'capacity'; see expert_parallel).
      buffer_factor: ragged receive buffer in multiples of the mean load (None: worst case).
      platform: lowering platform ('cuda', 'rocm', 'tpu', 'cpu').
      train_cfg: optimizer settings (default TrainConfig()).
    Returns:
      The Plan (print it with `format_plan`).
    """
    rules = get_rules(rules_name)
    sizes = {a: int(mesh_sizes.get(a, 1)) for a in AXES}
    PP = sizes["stage"]
    step_sizes = dict(sizes, stage=1)  # the pipeline stage is planned analytically
    mesh = abstract_mesh(step_sizes)
    mesh_shape = dict(mesh.shape)
    layout = expert_parallel.ep_layout(mesh_shape, rules)
    batch = layout.batch_shards if batch is None else batch
    if batch % layout.batch_shards:
        raise ValueError(
            f"batch={batch} must be divisible by the batch axes {layout.batch_axes} "
            f"(total size {layout.batch_shards})"
        )
    train_cfg = train_cfg or TrainConfig()
    shapes = RunShapes.build(cfg, train_cfg)  # the one abstract model of this plan
    graphdef, state, shardings = shapes.graphdef, shapes.state, shapes.shardings(mesh, rules)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    b_sh = batch_sharding(mesh, rules)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=b_sh)
    batch_in = {"input_ids": tokens, "labels": tokens}
    # The model runs under an explicit ParallelConfig on the abstract mesh: constraints and
    # shard_maps name it, so no context mesh is entered.
    parallel = ParallelConfig(
        mesh,
        rules,
        exchange if splits_tokens_or_experts(mesh_shape, rules) else "none",
        buffer_factor,
    )
    step = make_train_step(
        cfg, LossConfig(), train_cfg, graphdef, parallel=parallel, donate=False, shapes=shapes
    )
    start = time.perf_counter()
    traced = step.trace(state, batch_in)
    lowered = traced.lower(lowering_platforms=(platform,))
    lower_seconds = time.perf_counter() - start
    hlo_chars = len(lowered.as_text())

    B_l = batch // layout.batch_shards
    param_bytes = _tree_local_bytes(state.params, shardings.params, mesh_shape)
    opt_bytes = _tree_local_bytes(state.opt_state, shardings.opt_state, mesh_shape)
    opt_bytes += _tree_local_bytes(state.biases, shardings.biases, mesh_shape)
    grad_bytes = param_bytes  # gradients have the parameters' dtype and sharding
    collectives = collectives_from_jaxpr(traced.jaxpr, mesh_shape)
    abstract = shapes.model
    logical = {
        "/".join(str(k) for k in path): tuple(v.get_metadata().get("logical_axes", ()))
        for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    collectives.update(
        _analytic_collectives(
            cfg, state.params, logical, shardings.params, mesh_shape, rules, B_l, seq
        )
    )
    M_l = B_l * seq
    if not cfg.is_moe:  # dense models (DeepSeek LLM): no expert exchange
        rows = 0
    elif exchange == "capacity":
        rows = ep_plan.capacity_sizes(M_l, cfg, layout.ep_size).recv_rows
    else:
        rows = ep_plan.ragged_buffer_rows(M_l, cfg, layout.ep_size, buffer_factor)
    pairs = None  # the dropless pair exchange's rows per token
    P_ep = layout.ep_size
    if cfg.is_moe and exchange == "ragged" and P_ep > 1:
        if ep_plan.capacity_sizes(M_l, cfg, P_ep, budget=rows).never_overflows(P_ep):
            pairs = expert_parallel.mean_device_pairs(cfg, P_ep)
    act = _activation_estimate(cfg, mesh_shape, rules, B_l, seq, rows if cfg.is_moe else 0)
    act_note = "estimate: saved layer inputs + logits and their gradient + one layer's peak"
    stage_note = ""
    if PP > 1:
        L = cfg.num_hidden_layers
        per_stage = math.ceil(L / PP)
        frac = per_stage / L

        def part(keys):
            return sum(
                _tree_local_bytes(state.params[k], shardings.params[k], mesh_shape)
                for k in keys
                if state.params.get(k) is not None
            )

        # The first stage also holds the embedding; the last the norm, head and MTP modules.
        groups = abstract.param_groups()
        first, last = part(groups["embedding"]), part(groups["head"] + groups["mtp"])
        stage_bytes = part(groups["layers"]) * frac + max(first, last)
        opt_bytes *= stage_bytes / param_bytes  # the moments follow their parameters
        param_bytes = grad_bytes = stage_bytes
        b = jnp.dtype(cfg.compute_dtype).itemsize
        saved = (L + cfg.num_nextn_predict_layers) * B_l * seq * cfg.hidden_size * b
        act = (act - saved) + saved * frac * (PP + 1)
        for c in collectives.values():
            c.count = math.ceil(c.count * frac)
            c.operand_bytes *= frac
            c.wire_bytes *= frac
        p2p = 2 * B_l * seq * cfg.hidden_size * b  # activation forward, its gradient back
        collectives["pipeline send/recv (per micro-batch)"] = Collective(
            2, p2p, p2p, source="analytic"
        )
        stage_note = (
            f"stage={PP}: lowered on the per-stage mesh; heaviest stage holds {per_stage} of "
            f"{L} layers (+ embedding or head/MTP), {PP + 1} micro-batches in flight "
            "(DualPipe); collectives are the stage's share of the layers, per micro-batch"
        )
    counts = count_params(cfg, model=abstract)
    return Plan(
        config=config_name,
        mesh=sizes,
        rules=rules_name,
        batch=batch,
        seq=seq,
        exchange=exchange,
        buffer_factor=buffer_factor,
        platform=platform,
        params_total=counts.total + counts.mtp,
        params_activated=counts.activated,
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=opt_bytes,
        activation_bytes=act,
        activation_note=act_note,
        collectives=collectives,
        lower_seconds=lower_seconds,
        hlo_chars=hlo_chars,
        stage_note=stage_note,
        dispatch_pairs=pairs,
        experts_per_token=cfg.num_experts_per_tok if cfg.is_moe else 0,
    )


def format_plan(p: Plan) -> str:
    """The plan as the table the CLI prints."""
    n_dev = math.prod(p.mesh.values())
    mesh = " ".join(f"{a}={s}" for a, s in p.mesh.items())
    lines = [
        f"plan: {p.config}  {p.params_total / 1e9:.1f}B parameters incl. MTP "
        f"({p.params_activated / 1e9:.1f}B activated per token)",
        f"mesh: {mesh} ({n_dev} devices), rules {p.rules}; batch {p.batch} x {p.seq} tokens; "
        f"MoE exchange {p.exchange}"
        + (
            f" (receive buffer {p.buffer_factor:g}x mean load)"
            if p.buffer_factor and p.exchange == "ragged"
            else ""
        ),
        f"lowered the train step for {p.platform} on an abstract mesh in {p.lower_seconds:.1f} s "
        f"({p.hlo_chars / 1e6:.1f} M chars of StableHLO); nothing allocated",
    ]
    if p.stage_note:
        lines.append(p.stage_note)
    lines += [
        "",
        f"{'per-device memory':<44}{'GiB':>10}  source",
        f"{'  parameters (fp32 master)':<44}{p.param_bytes / GiB:>10.2f}  shardings",
        f"{'  gradients':<44}{p.grad_bytes / GiB:>10.2f}  shardings",
        f"{'  optimizer state (AdamW mu, nu; biases)':<44}{p.optimizer_bytes / GiB:>10.2f}  "
        "shardings",
        f"{'  activations':<44}{p.activation_bytes / GiB:>10.2f}  {p.activation_note}",
        f"{'  total':<44}{p.total_bytes / GiB:>10.2f}",
        "",
        f"{'per-step collectives per device':<44}{'count':>8}{'operand GiB':>13}"
        f"{'wire GiB':>11}  source",
    ]
    for kind, c in sorted(p.collectives.items(), key=lambda kv: kv[1].source != "traced"):
        src = "traced (jaxpr x scan trips)" if c.source == "traced" else "analytic"
        lines.append(
            f"  {kind:<42}{c.count:>8}{c.operand_bytes / GiB:>13.3f}{c.wire_bytes / GiB:>11.3f}"
            f"  {src}"
        )
    total = sum(c.wire_bytes for c in p.collectives.values())
    lines.append(f"  {'total':<42}{'':>8}{'':>13}{total / GiB:>11.3f}")
    if p.dispatch_pairs is not None:
        K = p.experts_per_token
        lines += [
            "",
            "ragged_all_to_all is counted at its bound, M_l K rows per exchange. The dropless "
            f"dispatch sends one row per (token, device) pair: {p.dispatch_pairs:.2f} of K = {K} "
            f"per token for this router over random logits ({p.dispatch_pairs / K:.0%} of the "
            "rows; bench/ep_dispatch_rows.py)",
        ]
    return "\n".join(lines)


def _load_config(name: str) -> ModelConfig:
    if os.path.isfile(name):
        return ModelConfig.from_file(name)
    return load_preset(os.path.splitext(os.path.basename(name))[0])


def main(argv: Sequence[str] | None = None) -> Plan | scaling.Recommendation:
    parser = argparse.ArgumentParser(prog="python -m deepseek_jax.plan", description=__doc__)
    parser.add_argument("--config", help="YAML/JSON file or preset name")
    parser.add_argument("--mesh", help="e.g. fsdp=32,expert=64 or stage=16,...")
    parser.add_argument(
        "--scaling",
        type=float,
        default=None,
        metavar="C",
        help="print DeepSeek LLM's scaling-law recommendation for compute C (FLOPs) and exit",
    )
    parser.add_argument("--rules", default=DEFAULT_RULES, help="sharding rules preset")
    parser.add_argument("--batch", type=int, default=None, help="global sequences per step")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--exchange", default="ragged", choices=["ragged", "capacity"])
    parser.add_argument(
        "--buffer-factor",
        type=float,
        default=2.0,
        help="ragged receive buffer / mean load (0 = worst case, never drops)",
    )
    parser.add_argument("--platform", default="cuda", help="lowering platform: cuda, tpu, ...")
    parser.add_argument("--dtype", default=None, help="override the compute dtype")
    args = parser.parse_args(argv)
    if args.scaling is not None:
        try:
            rec = scaling.recommend(args.scaling, seq_len=args.seq)
        except ValueError as e:
            parser.error(f"--scaling: {e}")
        print(scaling.format_recommendation(rec))
        return rec
    if args.config is None or args.mesh is None:
        parser.error("--config and --mesh are required (or --scaling C)")
    cfg = _load_config(args.config)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    mesh_cfg = MeshConfig.from_string(args.mesh, rules=args.rules)
    if -1 in mesh_cfg.sizes_tuple():
        parser.error(f"--mesh {args.mesh!r}: a plan needs every axis size (no -1)")
    result = plan(
        cfg,
        dict(zip(AXES, mesh_cfg.sizes_tuple(), strict=True)),
        args.rules,
        batch=args.batch,
        seq=args.seq,
        exchange=args.exchange,
        buffer_factor=args.buffer_factor or None,
        platform=args.platform,
        config_name=args.config,
    )
    print(format_plan(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
