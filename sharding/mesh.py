"""Device meshes over the named axes `data`, `fsdp`, `expert`, `tensor`, `stage`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor", "stage")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one axis may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    stage: int = 1
    rules: str = "fsdp"  # a preset of sharding.rules.RULE_PRESETS

    def __post_init__(self):
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
    shape = tuple(sizes.get(a, 1) for a in AXES)
    return jax.sharding.AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
