"""Pallas kernels for the grouped (per-expert) products (GPU Triton lowering; interpreted on CPU).

Rows of x are sorted by expert and group g owns rows [offsets[g], offsets[g+1]). Tiles over M do
not respect those boundaries, so, as in megablox's gmm, small metadata computed from
`group_sizes` tells each program which groups its rows touch:

* gmm   (out[m] = x[m] @ w[g(m)]): one program per [block_m, block_n] output tile. It loops
  over the groups its rows intersect (`GroupMetadata.tile_first..tile_last`), computes the full
  K product against that group's weight and keeps only the rows of the group. A tile is never
  shared between programs, so no atomics or revisiting are needed (unlike TPU megablox, whose
  grid walks (tile, group) pairs sequentially and revisits output tiles).
* tgmm  (dw[g] = x_g^T @ dy_g): one program per (group, K tile, N tile). It loops over the
  block_k-row tiles of M that overlap the group, masking rows outside it. Empty groups loop zero
  times and write zeros.

FP8 variants apply the scales once per contraction step (block_k), as the fp8 matmul does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .backend import BlockSizes


class GroupMetadata(NamedTuple):
    """Row ranges of groups and, per row tile, the first/last group its rows belong to.

    Attributes:
      offsets: [E + 1] int32, group g owns rows [offsets[g], offsets[g + 1]).
      tile_first: [num_tiles] int32, group of the tile's first row.
      tile_last: [num_tiles] int32, group of the tile's last valid row; tile_first - 1 for tiles
        wholly past sum(group_sizes), so their group loop is empty and they output zeros.
    """

    offsets: jax.Array
    tile_first: jax.Array
    tile_last: jax.Array


def group_metadata(group_sizes: jax.Array, num_rows: int, block_m: int) -> GroupMetadata:
    """Computes `GroupMetadata` for `num_rows` rows cut into tiles of `block_m` (jnp, traceable)."""
    offsets = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)]
    )
    total = offsets[-1]
    starts = jnp.arange(0, num_rows, block_m, dtype=jnp.int32)  # [num_tiles]
    ends = jnp.minimum(starts + block_m, total)  # exclusive
    # searchsorted over group *ends*: the number of groups ending at or before row r is the group
    # containing r; empty groups (end == start) are skipped automatically.
    first = jnp.searchsorted(offsets[1:], starts, side="right").astype(jnp.int32)
    last = jnp.searchsorted(offsets[1:], ends - 1, side="right").astype(jnp.int32)
    return GroupMetadata(offsets, first, jnp.where(starts < total, last, first - 1))


def _gmm_kernel(
    offsets_ref, first_ref, last_ref, x_ref, w_ref, *rest, block_m, block_k, num_k_blocks, scaled
):
    """Refs: x [bm, Kp], w [E, Kp, bn], (xs [bm, Kb], ws [E, Kb, bn]), o [bm, bn]."""
    if scaled:
        xs_ref, ws_ref, o_ref = rest
    else:
        (o_ref,) = rest
    i = pl.program_id(0)
    rows = i * block_m + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)  # [bm, 1] global rows

    def group_product(g):
        def k_step(kb, acc):
            ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
            part = jnp.dot(x_ref[:, ks], w_ref[g, ks, :], preferred_element_type=jnp.float32)
            if scaled:
                part = part * xs_ref[:, pl.ds(kb, 1)] * ws_ref[g, pl.ds(kb, 1), :]
            return acc + part

        return lax.fori_loop(0, num_k_blocks, k_step, jnp.zeros(o_ref.shape, jnp.float32))

    def group_step(g, acc):
        start, end = offsets_ref[g], offsets_ref[g + 1]
        in_group = (rows >= start) & (rows < end)  # [bm, 1]
        # Empty groups inside the tile's range cost nothing; masking once per group (not per K
        # step) keeps the inner loop a pure multiply-accumulate.
        return lax.cond(
            end > start,
            lambda: acc + jnp.where(in_group, group_product(g), 0.0),
            lambda: acc,
        )

    acc = lax.fori_loop(
        first_ref[i], last_ref[i] + 1, group_step, jnp.zeros(o_ref.shape, jnp.float32)
    )
    o_ref[...] = acc.astype(o_ref.dtype)


def gmm_pallas(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    x_scale: jax.Array | None,
    w_scale_cols: jax.Array | None,
    *,
    out_dtype: jnp.dtype,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """Grouped product on padded shapes; grouped_matmul.py pads and checks.

    Args:
      x: [Mp, Kp], Mp % block_m == 0, Kp % block_k == 0 (fp8 when scaled).
      w: [E, Kp, Np], Np % block_n == 0.
      group_sizes: [E] int32.
      x_scale: None, or [Mp, Kp / block_k] fp32 (1 x block_k tiles).
      w_scale_cols: None, or [E, Kp / block_k, Np] fp32 (per column per K block).
      out_dtype: output dtype.
      block_sizes: tile sizes.
      interpret: run interpreted (CPU).
    Returns:
      [Mp, Np]; rows outside every group are zero.
    """
    bm, bn, bk = block_sizes.block_m, block_sizes.block_n, block_sizes.block_k
    mp, kp = x.shape
    e, _, np_ = w.shape
    kb = kp // bk
    meta = group_metadata(group_sizes, mp, bm)
    scaled = x_scale is not None
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    in_specs = [
        whole((e + 1,)),
        whole((mp // bm,)),
        whole((mp // bm,)),
        pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
        pl.BlockSpec((e, kp, bn), lambda i, j: (0, 0, j)),
    ]
    args = [meta.offsets, meta.tile_first, meta.tile_last, x, w]
    if scaled:
        in_specs += [
            pl.BlockSpec((bm, kb), lambda i, j: (i, 0)),
            pl.BlockSpec((e, kb, bn), lambda i, j: (0, 0, j)),
        ]
        args += [x_scale.astype(jnp.float32), w_scale_cols.astype(jnp.float32)]
    kernel = functools.partial(_gmm_kernel, block_m=bm, block_k=bk, num_k_blocks=kb, scaled=scaled)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        name="fp8_gmm" if scaled else "gmm",
    )(*args)


def _tgmm_kernel(offsets_ref, x_ref, dy_ref, *rest, block_k, scaled):
    """Refs: x [Mp, bm], dy [Mp, bn], (xs [bm, Mb], dys [Mb, bn]), o [1, bm, bn].

    Here block_m tiles K (the rows of dw) and block_k tiles the contraction over tokens.
    """
    if scaled:
        xs_ref, dys_ref, o_ref = rest
    else:
        (o_ref,) = rest
    g = pl.program_id(0)
    start, end = offsets_ref[g], offsets_ref[g + 1]
    rows = lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)  # [bk, 1]

    def m_step(t, acc):
        ms = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        r = t * block_k + rows
        in_group = (r >= start) & (r < end)  # [bk, 1]
        # Zero the rows of neighbouring groups that share this M tile, in both operands so that
        # non-finite values there (e.g. cotangents of rows past sum(group_sizes)) cannot leak in.
        x = x_ref[ms, :]  # [bk, bm]
        x = jnp.where(in_group, x, jnp.zeros_like(x))
        dy = dy_ref[ms, :]  # [bk, bn]
        dy = jnp.where(in_group, dy, jnp.zeros_like(dy))
        part = lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [bm, bn]
        if scaled:
            part = part * xs_ref[:, pl.ds(t, 1)] * dys_ref[pl.ds(t, 1), :]
        return acc + part

    # lax.div (truncating) rather than `//`, as JAX's Pallas GPU attention kernel does for its
    # loop bound (it notes `//` does not lower there); both bounds are >= 0, so the two agree.
    acc = lax.fori_loop(
        lax.div(start, block_k),
        lax.div(end + block_k - 1, block_k),
        m_step,
        jnp.zeros(o_ref.shape[1:], jnp.float32),
    )
    o_ref[0] = acc.astype(o_ref.dtype)


def tgmm_pallas(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    x_scale: jax.Array | None,
    dy_scale: jax.Array | None,
    *,
    out_dtype: jnp.dtype,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """Transposed grouped product dw[g] = x_g^T @ dy_g on padded shapes.

    Args:
      x: [Mp, Kp], Mp % block_k == 0, Kp % block_m == 0 (fp8 when scaled).
      dy: [Mp, Np], Np % block_n == 0.
      group_sizes: [E] int32.
      x_scale: None, or [Mp / block_k, Kp] fp32 (block_k x 1 tiles along M).
      dy_scale: None, or [Mp / block_k, Np] fp32.
      out_dtype: output dtype.
      block_sizes: tile sizes (block_m tiles K here, block_k tiles M).
      interpret: run interpreted (CPU).
    Returns:
      [E, Kp, Np]; zero for empty groups.
    """
    bm, bn, bk = block_sizes.block_m, block_sizes.block_n, block_sizes.block_k
    mp, kp = x.shape
    np_ = dy.shape[1]
    e = group_sizes.shape[0]
    mb = mp // bk
    offsets = group_metadata(group_sizes, mp, bk).offsets
    scaled = x_scale is not None
    in_specs = [
        pl.BlockSpec((e + 1,), lambda g, i, j: (0,)),
        pl.BlockSpec((mp, bm), lambda g, i, j: (0, i)),
        pl.BlockSpec((mp, bn), lambda g, i, j: (0, j)),
    ]
    args = [offsets, x, dy]
    if scaled:
        # x's scales transposed to [Kp, Mb] so one M tile's scales load as a [bm, 1] column.
        in_specs += [
            pl.BlockSpec((bm, mb), lambda g, i, j: (i, 0)),
            pl.BlockSpec((mb, bn), lambda g, i, j: (0, j)),
        ]
        args += [x_scale.T.astype(jnp.float32), dy_scale.astype(jnp.float32)]
    kernel = functools.partial(_tgmm_kernel, block_k=bk, scaled=scaled)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, kp, np_), out_dtype),
        grid=(e, kp // bm, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, bm, bn), lambda g, i, j: (g, i, j)),
        interpret=interpret,
        name="fp8_tgmm" if scaled else "tgmm",
    )(*args)
