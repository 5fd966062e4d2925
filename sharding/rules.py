"""The one table from logical axes to mesh axes, with presets and validation.

Model code names logical axes only (`embed`, `heads`, `experts`, ...; see DESIGN.md). A rules
table maps each to a mesh axis, a tuple of mesh axes, or None (replicated). `param_shardings`
turns the model's abstract state into NamedShardings and rejects two things, naming the parameter:
a mesh axis used twice in one array, and a dimension not divisible by the product of its mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from deepseek_jax.sharding.logical import MeshAxes, logical_to_spec
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Activations: the batch is split over every data-like axis (the expert axis too: outside the
# routed experts, EP ranks act as data-parallel ranks, as in DeepSeek's training).
_BATCH = ("data", "fsdp", "expert")

RULE_PRESETS: dict[str, dict[str, MeshAxes]] = {
    # Pure data parallelism: parameters replicated.
    "dp": {"batch": _BATCH},
    # ZeRO-3 style: every weight's `embed` dimension split over fsdp.
    "fsdp": {"batch": _BATCH, "embed": "fsdp"},
    # FSDP for dense weights + routed experts split over the expert axis.
    "fsdp_ep": {"batch": _BATCH, "embed": "fsdp", "experts": "expert"},
    # Expert parallelism + Megatron-style tensor parallelism of heads and FFN hidden dims.
    "ep_tp": {
        "batch": _BATCH,
        "experts": "expert",
        "heads": "tensor",
        "mlp": "tensor",
        "expert_mlp": "tensor",
        "vocab": "tensor",
    },
    # Everything: FSDP + EP + TP (the 671B plan).
    "fsdp_ep_tp": {
        "batch": _BATCH,
        "embed": "fsdp",
        "experts": "expert",
        "heads": "tensor",
        "mlp": "tensor",
        "expert_mlp": "tensor",
        "vocab": "tensor",
    },
}


def get_rules(name_or_table: str | Mapping[str, MeshAxes]) -> dict[str, MeshAxes]:
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
    """PartitionSpec of one array, validated against collisions and divisibility."""
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
    return spec


def _logical_axes(var) -> tuple[str | None, ...] | None:
    meta = var.get_metadata() if isinstance(var, nnx.Variable) else {}
    return tuple(meta["logical_axes"]) if "logical_axes" in meta else None


def state_specs(state: nnx.State, rules: Mapping[str, MeshAxes], mesh_sizes: Mapping[str, int]):
    """Maps an (abstract) nnx.State to a same-structured tree of PartitionSpecs."""

    def one(path, var):
        name = "/".join(str(p) for p in path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        return spec_for(name, tuple(value.shape), _logical_axes(var), rules, mesh_sizes)

    return jax.tree.map_with_path(
        lambda p, v: one(tuple(getattr(k, "key", getattr(k, "name", k)) for k in p), v),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, MeshAxes]):
    """NamedSharding for every leaf of an (abstract) model state."""
    specs = state_specs(state, rules, dict(mesh.shape))
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
