"""`ParallelConfig`: how one model runs on devices, given to the model explicitly.

A frozen, hashable value (an NNX static attribute of `DeepSeekModel`): the device mesh (concrete,
abstract for planning, or None = one device), the logical-axis rules that place activations
(`constrain`), and the expert-parallel exchange of the MoE layers. What a forward pass computes
depends on this object and `ModelConfig.moe_impl` only, never on a context entered around the
call:

    exchange 'none'             the single-device plan of ModelConfig.moe_impl (dropless or
                                capacity), partitioned by GSPMD on a mesh;
    'ragged', 'ragged_emulated' the dropless all-to-all of moe/expert_parallel.py;
    'capacity'                  V2's device-level dropping over fixed all-to-all buffers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from deepseek_jax.sharding.logical import MeshAxes, activation_spec

Exchange = Literal["none", "capacity", "ragged", "ragged_emulated"]
EXCHANGES = ("none", "capacity", "ragged", "ragged_emulated")
_RAGGED_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def flat_axes(axes: MeshAxes) -> tuple[str, ...]:
    """A rules entry (None, one mesh axis or several) as a tuple of mesh axes."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _freeze(rules: Mapping[str, MeshAxes] | tuple) -> tuple[tuple[str, MeshAxes], ...]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for name, axes in items:
        out.append((name, axes if axes is None or isinstance(axes, str) else tuple(axes)))
    return tuple(sorted(out))


def default_exchange(moe_impl: str, backend: str | None = None) -> Exchange:
    """The exchange a split mesh gets: `capacity` for moe_impl='capacity', else dropless, the
    real ragged all-to-all where the backend has it (GPU/TPU), its all-gather emulation on CPU."""
    if moe_impl == "capacity":
        return "capacity"
    backend = jax.default_backend() if backend is None else backend
    return "ragged" if backend in _RAGGED_BACKENDS else "ragged_emulated"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh, logical-axis rules and the MoE exchange of one model (default: one device).

    Attributes:
      mesh: `jax.sharding.Mesh`, an `AbstractMesh` (lowering for the planner), or None.
      rules: logical axis -> mesh axes (`sharding.rules`), stored as a sorted tuple of pairs so
        the config hashes; a Mapping is accepted and frozen. Empty = no activation constraints.
      exchange: 'none' (the single-device MoE, partitioned by GSPMD), or the expert-parallel
        all-to-all: 'ragged', 'ragged_emulated' (CPU: all-gather emulation), 'capacity'.
      buffer_factor: receive rows of the ragged exchanges as a multiple of the mean load
        (`moe.ep_plan.ragged_buffer_rows`); None = the worst case, which never drops.
        Below the worst case a device over it drops its lowest-affinity arrivals across all
        sources (V2 Sec. 2.2.3); a protected sequence's rows come first, but the buffer is a
        hard bound, so they too drop (counted) when they alone overflow it.
    """

    mesh: Mesh | AbstractMesh | None = None
    rules: tuple[tuple[str, MeshAxes], ...] = ()
    exchange: Exchange = "none"
    buffer_factor: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "rules", _freeze(self.rules))
        if self.exchange not in EXCHANGES:
            raise ValueError(f"ParallelConfig.exchange={self.exchange!r}: allowed {EXCHANGES}")
        if self.buffer_factor is not None and not self.buffer_factor > 0:
            raise ValueError(
                f"ParallelConfig.buffer_factor={self.buffer_factor} must be positive or None"
            )
        if self.mesh is None and (self.rules or self.exchange != "none"):
            raise ValueError(
                "ParallelConfig.mesh is None (one device) but rules or "
                f"exchange={self.exchange!r} are set; give the mesh they refer to"
            )
        if self.mesh is not None:
            shape = self.mesh_shape
            for name, axes in self.rules:
                unknown = [a for a in flat_axes(axes) if a not in shape]
                if unknown:
                    raise ValueError(
                        f"ParallelConfig.rules[{name!r}] -> {axes!r}: {unknown} not mesh axes "
                        f"{tuple(shape)}"
                    )
            if self.exchange != "none" and not splits_tokens_or_experts(shape, self.rules_dict):
                raise ValueError(
                    f"ParallelConfig.exchange={self.exchange!r} needs rules whose 'batch' or "
                    "'experts' axes split the mesh; use exchange='none'"
                )

    @classmethod
    def create(
        cls,
        moe_impl: str,
        mesh: Mesh | AbstractMesh | None = None,
        rules: Mapping[str, MeshAxes] | None = None,
        *,
        exchange: Exchange | None = None,
        buffer_factor: float | None = None,
        backend: str | None = None,
    ) -> ParallelConfig:
        """The config of a run on `mesh` with `rules` (both None: one device).

        `exchange` None derives it: `default_exchange(moe_impl)` when the mesh splits the tokens
        or the experts, 'none' otherwise (or without rules).
        """
        rules = dict(rules or {})
        if mesh is None:
            return cls(exchange=exchange or "none", buffer_factor=buffer_factor)
        if exchange is None:
            split = bool(rules) and splits_tokens_or_experts(dict(mesh.shape), rules)
            exchange = default_exchange(moe_impl, backend) if split else "none"
        return cls(mesh, _freeze(rules), exchange, buffer_factor)

    @property
    def rules_dict(self) -> dict[str, MeshAxes]:
        return dict(self.rules)

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {} if self.mesh is None else dict(self.mesh.shape)

    @property
    def expert_parallel(self) -> bool:
        """True when the MoE layers run the all-to-all exchange under shard_map."""
        return self.exchange != "none"

    def sharding(self, axes) -> NamedSharding | None:
        """NamedSharding of an activation with logical `axes`; None without mesh or rules."""
        if self.mesh is None or not self.rules:
            return None
        return NamedSharding(self.mesh, activation_spec(axes, self.rules_dict))

    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def local(self) -> ParallelConfig:
        """One device's view: no constraints, no exchange (inside a manual shard_map, e.g. a
        pipeline stage, where the caller places activations itself)."""
        return ParallelConfig()


def splits_tokens_or_experts(mesh_shape: Mapping[str, int], rules: Mapping[str, MeshAxes]) -> bool:
    """Whether the rules' 'batch' or 'experts' axes have more than one device in `mesh_shape`."""
    batch = [a for a in flat_axes(rules.get("batch")) if a in mesh_shape]
    experts = [a for a in flat_axes(rules.get("experts")) if a in mesh_shape]
    return (
        math.prod(mesh_shape[a] for a in batch) > 1 or math.prod(mesh_shape[a] for a in experts) > 1
    )


ONE_DEVICE = ParallelConfig()
