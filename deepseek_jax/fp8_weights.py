"""Weights kept in FP8 for serving: DeepSeek-V3/R1's block-scaled E4M3 checkpoints, as stored.

A hub FP8 checkpoint stores every decoder linear weight as float8_e4m3fn with one fp32
`weight_scale_inv` per 128x128 block (V3 report Sec. 3.3.2, "fine-grained quantization"):
    W[k, n] ~= W_fp8[k, n] * s[k // 128, n // 128]
Loading it with `load_pretrained(path, weights="fp8")` keeps those bytes: the parameter is an
`Fp8Param` whose value is an `Fp8Weight` (E4M3 data in the parameter's own shape plus the block
scale grid of its 2-D [K, N] view), one byte per weight instead of BF16's two. The model's
projections then run the V3 recipe's forward product with the stored weight: activations are
quantized on the fly in 1 x 128 tiles and multiplied by the project's block-scaled FP8 matmul
(`linear`) or grouped expert GEMM (the routed experts), accumulating in fp32.

What stays high precision is what the recipe keeps high precision: embedding, output head, norms,
the gate (router) and the attention core. The absorbed MLA decode path multiplies W^UK / W^UV
into the query and the attention output per head (not a plain [K, N] product), so it reads the
dense form `w.astype(dtype)` of `wkv_b` in the jitted step, as DeepSeek's own inference code
dequantizes `wkv_b` for its "absorb" mode; the stored parameter stays FP8.

Serving weights are not trainable: gradients are not defined for stored FP8 weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.kernels.backend import BlockSizes, cdiv
from deepseek_jax.kernels.block_grouped_matmul import block_gmm_stored_fp8
from deepseek_jax.kernels.fp8_matmul import fp8_matmul
from deepseek_jax.kernels.grouped_matmul import gmm
from deepseek_jax.kernels.quant import (
    E4M3,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A weight in E4M3 with one fp32 scale per `block x block` block of its [K, N] view.

    The first `in_dims` axes after any stack axes (layers, experts) are contracted (K); the
    rest are the output (N). Build one with `Fp8Weight.create` (validated) or `quantize`.

    Attributes:
      data: [*stack, *k_dims, *n_dims] float8_e4m3fn.
      scale: [*stack, ceil(K / block), ceil(N / block)] float32; W ~= data * scale per block.
      block: block edge (128 in DeepSeek's checkpoints).
      in_dims: number of contracted axes (2 for MLA's output projection [N, v, D]).
    """

    data: jax.Array
    scale: jax.Array
    block: int = dataclasses.field(metadata=dict(static=True))
    in_dims: int = dataclasses.field(default=1, metadata=dict(static=True))

    @classmethod
    def create(cls, data, scale, *, block: int, in_dims: int = 1) -> Fp8Weight:
        """Checks dtypes and that `scale` is the block grid of `data`'s [K, N] view."""
        if jnp.dtype(data.dtype) != jnp.dtype(E4M3):
            raise TypeError(f"Fp8Weight data.dtype={data.dtype} must be float8_e4m3fn")
        BlockSizes(block_k=block)  # the kernels' block: a positive power of two
        if in_dims < 1:
            raise ValueError(f"Fp8Weight {in_dims=} must be >= 1")
        w = cls(data, jnp.asarray(scale, jnp.float32), block, in_dims)
        s = max(w.n_stack, 0)
        k = math.prod(data.shape[s : s + in_dims])
        n = math.prod(data.shape[s + in_dims :])
        want = data.shape[:s] + (cdiv(k, block), cdiv(n, block))
        if w.n_stack < 0 or s + in_dims >= data.ndim or tuple(scale.shape) != want:
            raise ValueError(
                f"Fp8Weight scale.shape={tuple(scale.shape)} must be {want}: the {block}x{block} "
                f"block grid of data{tuple(data.shape)} viewed as [K={k}, N={n}]"
            )
        return w

    # ---- array-like surface: what model code does with `param[...]` --------------------------
    @property
    def n_stack(self) -> int:
        """Leading stack axes (layers, experts): the scale grid has two axes after them."""
        return self.scale.ndim - 2

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.size * self.data.dtype.itemsize + self.scale.size * 4

    def __getitem__(self, key):
        # `variable[...]` reads the whole value; slicing a block-scaled weight is not defined.
        if key is not Ellipsis:
            raise TypeError(f"Fp8Weight supports only w[...], got w[{key!r}]")
        return self

    def astype(self, dtype) -> jax.Array:
        """The dense weight data * scale in `dtype` (same shape as `data`)."""
        return self.dequantize(dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        lead = self.data.shape[: self.n_stack]
        mat = self.data.reshape(*lead, *self.kn)  # [*stack, K, N]
        dense = dequantize_weight(mat, self.scale, block_size=self.block, dtype=jnp.dtype(dtype))
        return dense.reshape(self.data.shape)

    @property
    def kn(self) -> tuple[int, int]:
        """(K, N) of the 2-D view (stack axes excluded)."""
        s = self.n_stack
        k = math.prod(self.data.shape[s : s + self.in_dims])
        return k, math.prod(self.data.shape[s + self.in_dims :])


class Fp8Param(nnx.Param):
    """A parameter held as an `Fp8Weight` (chosen at load time; not trainable)."""


def quantize(w: jax.Array, *, in_dims: int = 1, stack_dims: int = 0, block: int = 128) -> Fp8Weight:
    """Quantizes a dense weight to E4M3 in block x block blocks of its [K, N] view.

    Args:
      w: [*stack, *k_dims, *n_dims] float weight.
      in_dims: number of contracted axes after the stack axes.
      stack_dims: leading axes quantized independently (layers, experts).
      block: block edge.
    Returns:
      The Fp8Weight (scale = block amax / 448, as `kernels.quant.quantize_weight`).
    """
    lead = w.shape[:stack_dims]
    k = math.prod(w.shape[stack_dims : stack_dims + in_dims])
    q, s = quantize_weight(w.reshape(*lead, k, -1), block_size=block)
    return Fp8Weight.create(q.reshape(w.shape), s, block=block, in_dims=in_dims)


def linear(x: jax.Array, w: Fp8Weight, in_dims: int, out_dtype) -> jax.Array:
    """y = x @ W with the stored FP8 weight (V3 Fprop: x quantized in 1 x block tiles).

    Args:
      x: [..., *k_dims] activations.
      w: Fp8Weight without stack axes, [*k_dims, *n_dims].
      in_dims: contracted axes, must equal w.in_dims.
      out_dtype: result dtype.
    Returns:
      [..., *n_dims] in out_dtype.
    """
    if w.n_stack != 0 or w.in_dims != in_dims:
        raise ValueError(
            f"FP8 linear: weight{w.shape} with {w.n_stack} stack axes and in_dims={w.in_dims} "
            f"cannot contract {in_dims} axes"
        )
    k_shape, n_shape = w.shape[:in_dims], w.shape[in_dims:]
    if x.shape[-in_dims:] != k_shape:
        raise ValueError(f"linear: x{x.shape} does not match weight{w.shape} on {in_dims} dims")
    k, n = w.kn
    xq, xs = quantize_activation(x.reshape(-1, k), block_size=w.block)  # [M, K], [M, Kb]
    y = fp8_matmul(
        xq,
        xs,
        w.data.reshape(k, n),
        w.scale,
        out_dtype=jnp.dtype(out_dtype),
        block_sizes=BlockSizes(block_k=w.block),
    )  # [M, N]
    return y.reshape(x.shape[:-in_dims] + n_shape)


def grouped_matmul(x: jax.Array, w: Fp8Weight, group_sizes: jax.Array) -> jax.Array:
    """Routed experts with stored FP8 weights: x [M, K] sorted by expert, w [E, K, N] -> [M, N].

    Each row is quantized in 1 x block tiles; expert e uses its own block scales w.scale[e].
    """
    if w.n_stack != 1 or w.in_dims != 1 or w.ndim != 3:
        raise ValueError(f"FP8 grouped matmul: weight must be [E, K, N], got {w.shape}")
    xq, xs = quantize_activation(x, block_size=w.block)
    return gmm(
        xq,
        w.data,
        group_sizes,
        x_scale=xs,
        w_scale=w.scale,
        out_dtype=x.dtype,
        block_sizes=BlockSizes(block_k=w.block),
    )


def block_grouped_matmul(xs: jax.Array, w: Fp8Weight | tuple[Fp8Weight, ...], layout) -> jax.Array:
    """Routed experts with stored FP8 weights on the block-sparse tile layout (the CPU plan):
    xs [P, K] in tiles of one expert (`kernels.block_grouped_matmul.dispatch`), w [E, K, N] or a
    tuple of them (gate and up: one product, their outputs side by side).

    The same products as `grouped_matmul` (1 x block activation tiles, each expert's own block
    scales), with the work at the routed rows plus padding instead of `ragged_dot`'s E times.
    """
    ws = (w,) if isinstance(w, Fp8Weight) else tuple(w)
    for wi in ws:
        if wi.n_stack != 1 or wi.in_dims != 1 or wi.ndim != 3 or wi.block != ws[0].block:
            raise ValueError(f"FP8 grouped matmul: weight must be [E, K, N], got {wi.shape}")
    return block_gmm_stored_fp8(
        xs,
        tuple(wi.data for wi in ws),
        tuple(wi.scale for wi in ws),
        layout,
        block_size=ws[0].block,
    )


def weight_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of the model's variables: {'fp8': Fp8Param data + scales, 'other': the rest}."""
    fp8 = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, Fp8Param)))
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    return {"fp8": fp8, "other": total - fp8, "total": total}
