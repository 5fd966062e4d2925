"""Backend selection and tile sizes shared by the FP8 and grouped-matmul kernels.

Every kernel op takes `impl="auto"|"xla"|"pallas"|"triton"`:

* `"xla"`    - plain `jax.numpy` / `jax.lax` ops; runs everywhere.
* `"pallas"` - Pallas kernels written for the GPU (Triton) lowering. On CPU they run with
               `interpret=True` (a scan over the grid), so tests exercise the same kernel body.
* `"triton"` - hand-written Triton kernels called through jax-triton (GPU only, optional).
* `"auto"`   - `"pallas"` on GPU, `"xla"` elsewhere: interpret mode is for testing, not speed, and
               the kernels are written for the Triton lowering rather than TPU Mosaic.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "xla", "pallas", "triton"]
IMPLS: tuple[str, ...] = ("auto", "xla", "pallas", "triton")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for Python ints (static shapes)."""
    return -(-a // b)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels, named by role.

    `block_m x block_n` tiles the output of one program; `block_k` is the step along the
    contraction. For FP8 operands `block_k` is also the quantization block along the contraction
    (one scale per `block_k` elements, DeepSeek-V3's 128), so the fp32 accumulator is promoted with
    the scales once per step. For the transposed grouped product (dw = x^T dy) the output is
    [K, N] and the contraction runs over tokens, so there `block_m` tiles K and `block_k` tiles M.

    Attributes:
      block_m: rows of an output tile. Power of two (Triton tensor shapes must be).
      block_n: columns of an output tile. Power of two.
      block_k: contraction step and FP8 scale block. Power of two.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 128

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not _is_power_of_two(value):
                raise ValueError(f"BlockSizes.{name}={value!r} must be a positive power of two")


def resolve_impl(impl: str, *, op: str, triton_available: bool = True) -> str:
    """Maps `impl` to a concrete backend and checks that it can run here.

    Args:
      impl: one of IMPLS.
      op: name of the calling op, for error messages.
      triton_available: whether `op` has a jax-triton kernel at all.
    Returns:
      "xla", "pallas" or "triton".
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: {impl=} must be one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "triton":
        if not triton_available:
            raise NotImplementedError(
                f'{op}: impl="triton" has no jax-triton kernel; use "pallas" (Triton lowering)'
            )
        missing = [m for m in ("jax_triton", "triton") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f'{op}: impl="triton" needs the package(s) {missing} '
                '(pip install jax-triton; GPU only). Use impl="pallas" or "xla" instead.'
            )
        if jax.default_backend() != "gpu":
            backend = jax.default_backend()
            raise RuntimeError(f'{op}: impl="triton" needs a GPU; the JAX backend is {backend}')
    return impl


def interpret_mode() -> bool:
    """Whether Pallas kernels must run interpreted: on CPU there is no Pallas compiler."""
    return jax.default_backend() == "cpu"


def tile_rows(m: int, block_m: int) -> int:
    """Shrinks `block_m` for small M so a tiny batch does not pad to a full tile.

    Kept at >= 16 because Triton's `tl.dot` needs every dimension to be at least 16.
    """
    return min(block_m, max(16, 1 << max(m - 1, 0).bit_length()))


def pad_to_multiple(a: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` up to a multiple (no copy when already aligned, e.g. V3 shapes)."""
    extra = -a.shape[axis] % multiple
    if extra == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, extra)
    return jnp.pad(a, pad)
