"""The one table from logical axes to mesh axes, with presets and validation.

Model code names logical axes only (`embed`, `heads`, `experts`, ...). A rules
table maps each to a mesh axis, a tuple of mesh axes, or None (replicated). `param_shardings`
turns the model's abstract state into NamedShardings and rejects two things, naming the parameter:
a mesh axis used twice in one array, and a dimension not divisible by the product of its mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from deepseek_jax.sharding.logical import MeshAxes, logical_to_spec

# Activations: the batch is split over every data-like axis (the expert axis too: outside the
# routed experts, EP ranks act as data-parallel ranks, as in DeepSeek's training).
_BATCH = ("data", "fsdp", "expert")
# Not a logical axis: mesh axes that shard, in any parameter the table leaves off them, its
# largest dimension they divide (never `layers`, which the layer scan slices). FSDP needs it for
# weights without an `embed` dimension (MLA's wq_b [Q, N, H], wkv_b [C, N, nope + v]): no
# single logical axis can take `fsdp` there without colliding with `embed` in wq_a / wkv_a / wo.
FSDP_FALLBACK = "fsdp_fallback"

# The one default, wherever a mesh comes without rules: training (MeshConfig), loading and
# conversion (hf/), the planner. On a mesh whose expert and tensor axes are 1 it is plain FSDP.
DEFAULT_RULES = "fsdp_ep_tp"

RULE_PRESETS: dict[str, dict[str, MeshAxes]] = {
    # Pure data parallelism: parameters replicated.
    "dp": {"batch": _BATCH},
    # ZeRO-3 style: every weight's `embed` dimension split over fsdp.
    "fsdp": {"batch": _BATCH, "embed": "fsdp", FSDP_FALLBACK: "fsdp"},
    # FSDP for dense weights + routed experts split over the expert axis.
    "fsdp_ep": {"batch": _BATCH, "embed": "fsdp", "experts": "expert", FSDP_FALLBACK: "fsdp"},
    # Expert parallelism + Megatron-style tensor parallelism of heads and FFN hidden dims.
    "ep_tp": {
        "batch": _BATCH,
        "experts": "expert",
        "heads": "tensor",
        "kv_heads": "tensor",  # standard attention's K/V heads (GQA: fewer than `heads`)
        "mlp": "tensor",
        "expert_mlp": "tensor",
        "vocab": "tensor",
    },
    # Expert parallelism alone: routed experts split over `expert`, everything else replicated.
    "ep": {"batch": _BATCH, "experts": "expert"},
    # Everything: FSDP + EP + TP (the 671B plan).
    "fsdp_ep_tp": {
        "batch": _BATCH,
        "embed": "fsdp",
        "experts": "expert",
        "heads": "tensor",
        "kv_heads": "tensor",  # standard attention's K/V heads (GQA: fewer than `heads`)
        "mlp": "tensor",
        "expert_mlp": "tensor",
        "vocab": "tensor",
        FSDP_FALLBACK: "fsdp",
    },
}


def get_rules(name_or_table: str | Mapping[str, MeshAxes]) -> dict[str, MeshAxes]:
    """A copy of a preset (by name) or of a given table."""
    if isinstance(name_or_table, str):
        if name_or_table not in RULE_PRESETS:
            raise ValueError(
                f"unknown sharding rules {name_or_table!r}; presets: {sorted(RULE_PRESETS)}"
            )
        return dict(RULE_PRESETS[name_or_table])
    return dict(name_or_table)


def _flat(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_for(
    name: str,
    shape: tuple[int, ...],
    logical: tuple[str | None, ...] | None,
    rules: Mapping[str, MeshAxes],
    mesh_sizes: Mapping[str, int],
) -> PartitionSpec:
    """PartitionSpec of one array, validated against collisions and divisibility.

    Raises:
      ValueError naming the parameter `name` when a rule names no mesh axis, a mesh axis would
      shard two dimensions, or a dimension does not divide by the product of its mesh axes.
    """
    if logical is None:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"{name}: logical axes {logical} do not match its shape {shape}")
    spec = logical_to_spec(logical, rules)
    used: dict[str, str] = {}
    for dim, (size, logical_name, axes) in enumerate(zip(shape, logical, spec, strict=True)):
        flat = _flat(axes)
        for a in flat:
            if a not in mesh_sizes:
                raise ValueError(f"{name}: rule {logical_name!r} -> {a!r} names no mesh axis")
            if a in used:
                raise ValueError(
                    f"{name}: mesh axis {a!r} used twice (by {used[a]!r} and {logical_name!r})"
                )
            used[a] = logical_name
        n = math.prod(mesh_sizes[a] for a in flat)
        if size % n:
            raise ValueError(
                f"{name}: dimension {dim} ({logical_name!r}, size {size}) is not divisible by "
                f"mesh axes {flat} of total size {n}"
            )
    return _fallback(spec, shape, logical, rules, mesh_sizes, used)


def _fallback(spec, shape, logical, rules, mesh_sizes, used) -> PartitionSpec:
    """Applies `FSDP_FALLBACK`: its axes take the largest free dimension they divide."""
    axes = tuple(a for a in _flat(rules.get(FSDP_FALLBACK)) if a in mesh_sizes and a not in used)
    n = math.prod(mesh_sizes[a] for a in axes)
    if n <= 1:
        return spec
    free = [
        d
        for d, (size, name, entry) in enumerate(zip(shape, logical, spec, strict=True))
        if entry is None and name != "layers" and size % n == 0
    ]
    if not free:
        return spec  # best effort: a small or odd-sized weight stays replicated
    dim = max(free, key=lambda d: shape[d])
    entries = list(spec)
    entries[dim] = axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*entries)


def _logical_axes(var) -> tuple[str | None, ...] | None:
    meta = var.get_metadata() if isinstance(var, nnx.Variable) else {}
    return tuple(meta["logical_axes"]) if "logical_axes" in meta else None


def key_name(k) -> str:
    """A jax key-path entry as a name: a dict key, an attribute or field name, an index (as
    Orbax names it in a checkpoint's `_METADATA` too)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_name(path) -> str:
    return "/".join(key_name(k) for k in path)


def state_specs(state, rules: Mapping[str, MeshAxes], mesh_sizes: Mapping[str, int]):
    """Maps an (abstract) nnx.State, or any tree of nnx.Variables, to PartitionSpecs.

    A Variable without `logical_axes` metadata (e.g. the routing bias) and a bare array leaf
    (e.g. an optimizer's step count) are replicated.
    """

    def one(path, var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = tuple(getattr(value, "shape", ()))
        return spec_for(_path_name(path), shape, _logical_axes(var), rules, mesh_sizes)

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh: Mesh | AbstractMesh, rules: Mapping[str, MeshAxes]):
    """NamedSharding for every leaf of an (abstract) model state (see `state_specs`).

    Optimizer states built by optax over an nnx.State keep the Variables (and their metadata),
    so `param_shardings(opt_state, ...)` shards Adam's moments like their parameters.
    """
    specs = state_specs(state, rules, dict(mesh.shape))
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_spec(rules: Mapping[str, MeshAxes], mesh_sizes: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec of a [B, T] batch: B over the rules' `batch` mesh axes, T replicated."""
    axes = tuple(a for a in _flat(rules.get("batch")) if a in mesh_sizes)
    return PartitionSpec(axes or None, None)


def batch_sharding(mesh: Mesh | AbstractMesh, rules: Mapping[str, MeshAxes]) -> NamedSharding:
    """NamedSharding of a [B, T] batch (see `batch_spec`)."""
    return NamedSharding(mesh, batch_spec(rules, dict(mesh.shape)))
