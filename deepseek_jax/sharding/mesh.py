"""Device meshes over the named axes `data`, `fsdp`, `expert`, `tensor`, `stage`.

`make_mesh` builds the mesh over every device of every process (`jax.devices()` is global once
`jax.distributed.initialize` has run), with `jax.make_mesh` choosing a topology-aware device
order; sizes of 1 are allowed, so every mesh has all five axes. `abstract_mesh` is the same
layout without devices, for planning (`python -m deepseek_jax.plan`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from deepseek_jax.sharding.rules import DEFAULT_RULES

AXES = ("data", "fsdp", "expert", "tensor", "stage")


def parse_mesh(text: str) -> dict[str, int]:
    """'expert=64, fsdp=32' -> {'expert': 64, 'fsdp': 32}: the named axes only (the one parser of
    mesh strings: the run config's, the planner's and the converter's)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = (p.strip() for p in item.partition("="))
        if not sep or name not in AXES:
            raise ValueError(f"mesh {text!r}: expected axis=size with axis in {AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: size of {name!r} must be an integer") from None
    return sizes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one axis may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    stage: int = 1
    rules: str = DEFAULT_RULES  # a preset of sharding.rules.RULE_PRESETS

    def __post_init__(self):
        from deepseek_jax.sharding.rules import RULE_PRESETS

        if self.rules not in RULE_PRESETS:
            raise ValueError(
                f"MeshConfig.rules={self.rules!r} is invalid: allowed {sorted(RULE_PRESETS)}"
            )
        sizes = self.sizes_tuple()
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(
                f"MeshConfig: at most one axis may be -1, got {dict(zip(AXES, sizes, strict=True))}"
            )
        for name, s in zip(AXES, sizes, strict=True):
            if s == 0 or s < -1:
                raise ValueError(f"MeshConfig.{name}={s} is invalid: must be a positive size or -1")

    def sizes_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @classmethod
    def from_string(cls, text: str, rules: str = DEFAULT_RULES) -> MeshConfig:
        """Parses 'expert=64,fsdp=32' (unnamed axes default to 1; one size may be -1)."""
        return cls(**{**dict.fromkeys(AXES, 1), **parse_mesh(text)}, rules=rules)

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; raises if they do not multiply to `num_devices`."""
        sizes = list(self.sizes_tuple())
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {dict(zip(AXES, sizes, strict=True))}: {num_devices} devices are "
                    f"not divisible by the fixed axes' product {fixed}"
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} "
                f"devices, but {num_devices} are available"
            )
        return dict(zip(AXES, sizes, strict=True))


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh over all (global, multi-host) devices with Auto axis types.

    Auto axes let XLA propagate shardings from parameters and the constraints placed at block
    boundaries; expert-parallel code switches to manual axes inside `jax.shard_map`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
    """A device-free mesh for planning (e.g. 2048 devices) with the project's axis names."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"abstract_mesh: unknown axes {unknown}; allowed {AXES}")
    shape = tuple(sizes.get(a, 1) for a in AXES)
    return jax.sharding.AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
