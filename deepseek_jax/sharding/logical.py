"""Logical-axis names -> mesh axes, applied to activations at block boundaries.

Model code names only logical axes (`batch`, `seq`, `embed`, `heads`, `experts`, ...). Outside any
`use_rules(...)` context `constrain` is the identity, so the model runs unsharded on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

MeshAxes = str | tuple[str, ...] | None
_RULES: contextvars.ContextVar[Mapping[str, MeshAxes] | None] = contextvars.ContextVar(
    "deepseek_jax_logical_rules", default=None
)


@contextlib.contextmanager
def use_rules(rules: Mapping[str, MeshAxes]) -> Iterator[None]:
    """Activates a logical-axis -> mesh-axes table for `constrain` within the context."""
    token = _RULES.set(dict(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


@contextlib.contextmanager
def suspend_rules() -> Iterator[None]:
    """Turns `constrain` off within the context (e.g. inside a shard_map with manual axes)."""
    token = _RULES.set(None)
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Mapping[str, MeshAxes] | None:
    return _RULES.get()


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, MeshAxes]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; unknown names are replicated."""
    return PartitionSpec(*(rules.get(a) if a is not None else None for a in axes))


def activation_spec(axes: Sequence[str | None], rules: Mapping[str, MeshAxes]) -> PartitionSpec:
    """Like `logical_to_spec`, but a mesh axis already taken by an earlier dimension is dropped.

    Weights and activations share logical names: under FSDP `embed` -> fsdp shards a weight's
    D, while an activation [B, T, D] already splits B over fsdp; the earlier (batch) dimension
    keeps the axis and D stays whole there.
    """
    used: set[str] = set()
    out = []
    for entry in logical_to_spec(axes, rules):
        flat = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(a for a in flat if a not in used)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` to the sharding of its logical `axes` (no-op without rules).

    Needs a context mesh (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` to plan).
    """
    rules = _RULES.get()
    if rules is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(
            f"constrain: {len(axes)} logical axes {tuple(axes)} for a {x.ndim}-d array"
        )
    return jax.lax.with_sharding_constraint(x, activation_spec(axes, rules))
