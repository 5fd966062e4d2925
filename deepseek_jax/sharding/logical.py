"""Logical-axis names -> mesh axes, applied to activations at block boundaries.

Model code names only logical axes (`batch`, `seq`, `embed`, `heads`, `experts`, ...);
`constrain` places an activation by the mesh and rules of the `ParallelConfig` it is given
(sharding/parallel.py) and is the identity for one device (no mesh or no rules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

if TYPE_CHECKING:
    from deepseek_jax.sharding.parallel import ParallelConfig

MeshAxes = str | tuple[str, ...] | None


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


def constrain(x: jax.Array, axes: Sequence[str | None], parallel: ParallelConfig) -> jax.Array:
    """Constrains activation `x` to the sharding of its logical `axes` under `parallel`.

    The identity without a mesh or rules (one device, or inside a manual shard_map).
    """
    if len(axes) != x.ndim:
        raise ValueError(
            f"constrain: {len(axes)} logical axes {tuple(axes)} for a {x.ndim}-d array"
        )
    sharding = parallel.sharding(axes)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def varying_axes(a: jax.Array) -> frozenset[str]:
    """The shard_map manual axes `a` varies over (the aval's `mat.varying`, `vma` in other JAX
    versions); empty outside shard_map."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_over(axes: Sequence[str], *arrays: jax.Array) -> list[jax.Array]:
    """Casts each array to vary over every one of the manual `axes` it does not vary over yet.

    Loops under shard_map need it (an initial carry must be typed like the body's output), and
    so do custom-VJP kernels (a cotangent must be typed like its primal; the cast's transpose is
    the psum over the added axes).
    """

    def cast(a):
        missing = tuple(ax for ax in axes if ax not in varying_axes(a))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return [cast(a) for a in arrays]


def zeros_varying_like(shape, dtype, *like: jax.Array) -> jax.Array:
    """Zeros typed to vary over every manual axis that any of `like` does: a loop's initial
    carry must match its body's output under shard_map (the expert-parallel path runs the
    block-sparse and FP8 kernels' loops per device). Plain zeros outside shard_map."""
    axes = sorted(frozenset().union(*(varying_axes(a) for a in like)))
    return vary_over(axes, jnp.zeros(shape, dtype))[0]
