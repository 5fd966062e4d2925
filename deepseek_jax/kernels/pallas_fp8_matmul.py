"""Pallas kernel for the FP8 block-scaled matmul (GPU Triton lowering; interpreted on CPU).

One program owns one [block_m, block_n] output tile and walks the contraction in block_k steps,
the quantization block: each step is an FP8 x FP8 -> fp32 tensor-core product that is scaled by
the activation-tile and weight-block scales and added to an fp32 accumulator. That is the
"promotion to CUDA cores every 128 elements" of DeepSeek-V3 Sec. 3.3.2, expressed in Triton terms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .backend import BlockSizes


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k: int, num_k_blocks: int):
    """Refs: x [bm, Kp] fp8, xs [bm, Kb], w [Kp, bn] fp8, ws [Kb, bn], o [bm, bn]."""

    def step(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        part = jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)
        # [bm, 1] * [1, bn]: activation-tile scale per row, weight-block scale per column.
        return acc + part * xs_ref[:, pl.ds(kb, 1)] * ws_ref[pl.ds(kb, 1), :]

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = lax.fori_loop(0, num_k_blocks, step, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def fp8_matmul_pallas(
    x: jax.Array,
    x_scale: jax.Array,
    w: jax.Array,
    w_scale_cols: jax.Array,
    *,
    out_dtype: jnp.dtype,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """Padded-shape kernel launch; the public wrapper in fp8_matmul.py pads and checks shapes.

    Args:
      x: [Mp, Kp] float8_e4m3fn, Mp % block_m == 0, Kp % block_k == 0.
      x_scale: [Mp, Kp / block_k] fp32.
      w: [Kp, Np] float8_e4m3fn, Np % block_n == 0.
      w_scale_cols: [Kp / block_k, Np] fp32, one scale per column per K block.
      out_dtype: output dtype.
      block_sizes: tile sizes.
      interpret: run the kernel interpreted (CPU).
    Returns:
      [Mp, Np] in out_dtype.
    """
    bm, bn, bk = block_sizes.block_m, block_sizes.block_n, block_sizes.block_k
    mp, kp = x.shape
    np_ = w.shape[1]
    kb = kp // bk
    kernel = functools.partial(_kernel, block_k=bk, num_k_blocks=kb)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, kb), lambda i, j: (i, 0)),
            pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
            pl.BlockSpec((kb, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        name="fp8_block_scaled_matmul",
    )(x, x_scale.astype(jnp.float32), w, w_scale_cols.astype(jnp.float32))
