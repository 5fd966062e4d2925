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


def current_rules() -> Mapping[str, MeshAxes] | None:
    return _RULES.get()


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, MeshAxes]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; unknown names are replicated."""
    return PartitionSpec(*(rules.get(a) if a is not None else None for a in axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` to the sharding of its logical `axes` (no-op without rules)."""
    rules = _RULES.get()
    if rules is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(
            f"constrain: {len(axes)} logical axes {tuple(axes)} for a {x.ndim}-d array"
        )
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
