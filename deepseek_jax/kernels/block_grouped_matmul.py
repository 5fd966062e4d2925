"""Block-sparse grouped GEMM: rows sorted by group and padded to tiles owned by one group each.

    tiles[t] = rows of group g(t), padded with zero rows to `block`;   out[t] = tiles[t] @ w[g(t)]

`jax.lax.ragged_dot` is what XLA offers for a grouped product, but XLA:CPU lowers it to about E
dense products over all M rows (E times the routed FLOPs). Here the layout is static instead:
with R routed rows in E groups, each group is padded to a multiple of `block`, which needs at most
    num_tiles = (R + E * (block - 1)) // block
tiles; the product loops over the groups and, in each, over its tiles in use, in chunks of up to 8
consecutive tiles (one [8 b, K] x [K, N] matmul per step), so the work is the routed FLOPs plus
each group's padding to a whole tile (< E * block rows).

The layout maps assignments (token m, choice k) to slots and back. Rows move between tokens and
slots by gathers both ways (`dispatch` / `combine` and their VJPs), never by a scatter of rows
(slow on CPU):
    dispatch:   xs[p] = x[token(p)]            (zero for padding slots)
    dispatch^T: dx[m] = sum_k dxs[slot(m, k)]
    combine:    y[m] = sum_k g[m, k] ys[slot(m, k)]
    combine^T:  dys[p] = g(p) dy[token(p)],  dg[m, k] = dy[m] . ys[slot(m, k)]

Used by the dropless MoE on CPU (deepseek_jax/moe/ `routed_blocked`). Its plain twins,
`ragged_dot` and the one-hot reference of grouped_matmul_reference.py, are held equal to it
(forward and VJP) by tests/kernels/test_block_grouped_matmul.py.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from deepseek_jax.sharding.logical import zeros_varying_like

from .backend import pad_to_multiple
from .quant import (
    DEFAULT_BLOCK,
    quantize_activation,
    quantize_dequantize_activation,
    quantize_weight,
    repeat_scale,
)

__all__ = [
    "BlockLayout",
    "block_gmm",
    "block_gmm_fp8",
    "block_gmm_stored_fp8",
    "block_layout",
    "choose_block",
    "combine",
    "dispatch",
]


class BlockLayout(NamedTuple):
    """Where each assignment lives in the padded, tile-aligned buffer of P = T * block slots.

    Attributes:
      slot: [R] int32 slot of each assignment (row-major over [M, K]).
      source: [P] int32 assignment held by each slot, R for a padding slot.
      tile_group: [T] int32 group owning each tile (unused trailing tiles: the last group, all
        their rows are padding).
      tiles_used: [] int32 tiles holding at least one assignment (the first ones).
      block: rows per tile (static).
    """

    slot: jax.Array
    source: jax.Array
    tile_group: jax.Array
    tiles_used: jax.Array
    block: int


def choose_block(rows: int, groups: int) -> int:
    """Rows per tile: the largest power of two in [8, 128] keeping padding <= ~1/8 of the rows.

    Padding is at most groups * (block - 1) rows; smaller tiles waste fewer FLOPs but make more,
    smaller matmuls and more weight copies.
    """
    block = 128
    while block > 8 and groups * block > rows // 8:
        block //= 2
    return block


def num_tiles(rows: int, groups: int, block: int) -> int:
    """Static upper bound on sum_g ceil(n_g / block) over any split of `rows` into `groups`."""
    return max(1, (rows + groups * (block - 1)) // block)


def block_layout(groups: jax.Array, num_groups: int, block: int) -> BlockLayout:
    """The tile layout of assignments to groups.

    Args:
      groups: [R] int group of each assignment, in [0, num_groups).
      num_groups: E.
      block: rows per tile.
    Returns:
      BlockLayout with T = num_tiles(R, E, block) tiles.
    """
    (R,) = groups.shape
    E = num_groups
    T = num_tiles(R, E, block)
    one_hot = jax.nn.one_hot(groups, E, dtype=jnp.int32)  # [R, E]
    sizes = one_hot.sum(0)  # [E]
    # Rank of each assignment within its group (stable: assignment order).
    rank = jnp.take_along_axis(jnp.cumsum(one_hot, 0), groups[:, None], 1)[:, 0] - 1  # [R]
    tiles = -(-sizes // block)  # [E] tiles per group
    tile_end = jnp.cumsum(tiles)  # [E]
    tile_start = tile_end - tiles
    slot = (tile_start[groups] * block + rank).astype(jnp.int32)  # [R]
    source = jnp.full((T * block,), R, jnp.int32).at[slot].set(jnp.arange(R, dtype=jnp.int32))
    tile_group = jnp.searchsorted(tile_end, jnp.arange(T), side="right")
    tile_group = jnp.minimum(tile_group, E - 1).astype(jnp.int32)  # [T]
    return BlockLayout(slot, source, tile_group, tile_end[-1].astype(jnp.int32), block)


def _take_rows(a: jax.Array, index: jax.Array) -> jax.Array:
    """a[index] along axis 0, zero where index is out of range."""
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


# ----------------------------------------------------------------------------------------------
# dispatch: tokens -> slots.
# ----------------------------------------------------------------------------------------------


@jax.custom_vjp
def _dispatch(x, source_token, slot):
    return _take_rows(x, source_token)


def _dispatch_fwd(x, source_token, slot):
    return _dispatch(x, source_token, slot), (source_token, slot)


def _dispatch_bwd(res, dxs):
    source_token, slot = res
    dx = _take_rows(dxs, slot.reshape(-1)).reshape(*slot.shape, -1).sum(1)  # [M, D]
    return dx, None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def dispatch(x: jax.Array, layout: BlockLayout, k: int) -> jax.Array:
    """x [M, D] -> xs [P, D]: each token's row copied to its K slots, zeros in padding slots."""
    source_token = layout.source // k  # padding (R) -> M: out of range -> zero row
    return _dispatch(x, source_token, layout.slot.reshape(-1, k))


# ----------------------------------------------------------------------------------------------
# combine: slots -> tokens, weighted by the gates.
# ----------------------------------------------------------------------------------------------


@jax.custom_vjp
def _combine(ys, g, slot, source):
    y = _take_rows(ys, slot.reshape(-1)).reshape(*slot.shape, -1)  # [M, K, D]
    return jnp.einsum("mkd,mk->md", y, g.astype(y.dtype))


def _combine_fwd(ys, g, slot, source):
    return _combine(ys, g, slot, source), (ys, g, slot, source)


def _combine_bwd(res, dy):
    ys, g, slot, source = res
    k = slot.shape[1]
    g_slot = _take_rows(g.reshape(-1), source)  # [P], zero for padding
    dys = _take_rows(dy, source // k) * g_slot[:, None].astype(dy.dtype)  # [P, D]
    y = _take_rows(ys, slot.reshape(-1)).reshape(*slot.shape, -1)  # [M, K, D]
    dg = jnp.einsum("mkd,md->mk", y, dy, preferred_element_type=jnp.float32)
    return dys.astype(ys.dtype), dg.astype(g.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(ys: jax.Array, g: jax.Array, layout: BlockLayout) -> jax.Array:
    """ys [P, D], gates g [M, K] -> y [M, D] = sum_k g[m, k] ys[slot(m, k)]."""
    return _combine(ys, g, layout.slot.reshape(g.shape), layout.source)


# ----------------------------------------------------------------------------------------------
# The per-tile product.
# ----------------------------------------------------------------------------------------------


def _group_tiles(tile_group: jax.Array, used: jax.Array, num_groups: int):
    """[E] first tile and end tile of each group's consecutive tiles (only tiles in use)."""
    e = jnp.arange(num_groups)
    start = jnp.searchsorted(tile_group, e, side="left")
    end = jnp.minimum(jnp.searchsorted(tile_group, e, side="right"), used)
    return start.astype(jnp.int32), jnp.maximum(end, start).astype(jnp.int32)


# A group's tiles are multiplied in chunks of CHUNKS[i] consecutive tiles, largest first: the
# padding stays one tile per group, but most products are [8 b, K] x [K, N] instead of [b, K] x
# [K, N] (XLA:CPU runs a 64-row product at about half the FLOP rate of a 512-row one).
CHUNKS = (8, 4, 2, 1)


def _chunk_sizes(num_tiles: int, num_groups: int) -> tuple[int, ...]:
    """The chunk sizes worth a compiled loop each: up to the mean tiles per group, and none but
    single tiles below a mean of 4 (small products, where the extra loops only add compile time:
    25% more for the test suite's tiny models)."""
    mean = num_tiles // num_groups
    return tuple(c for c in CHUNKS if c <= mean) if mean >= 4 else (1,)


def _over_chunks(start, end, b: int, sizes: tuple[int, ...], body, carry):
    """carry = body(row, size, carry) for the chunks of tiles [start, end), `row` a chunk's first.

    Greedy: as many chunks of sizes[0] tiles as fit, then of sizes[1] in what is left, ...; a
    static loop per chunk size (sizes ends with 1), so each size is one compiled product.
    """
    t = start
    for tiles in sizes:
        n = (end - t) // tiles

        def step(i, carry, t=t, tiles=tiles):
            return body((t + i * tiles) * b, tiles * b, carry)

        carry = lax.fori_loop(0, n, step, carry)
        t = t + n * tiles
    return carry


def _tile_products(rows, n, num_groups, tile_group, used, group_operand, product, like, dtype):
    """out [rows, n]: per group g, `group_operand(g)` (its weight) once, then for each chunk of
    g's tiles in use out[chunk] = product(operand, row, size); zero rows past `used`.

    A group's tiles are consecutive, so its weight is sliced once and stays put for all of
    them (slicing it per tile copied a [K, N] weight for every tile: a third of the time).
    `like`: the operands, whose shard_map variance the output takes.
    """
    T = tile_group.shape[0]
    b = rows // T
    start, end = _group_tiles(tile_group, used, num_groups)
    sizes = _chunk_sizes(T, num_groups)

    def group(g, out):
        operand = group_operand(g)

        def chunk(row, size, out):
            return lax.dynamic_update_slice_in_dim(out, product(operand, row, size), row, 0)

        return _over_chunks(start[g], end[g], b, sizes, chunk, out)

    out = zeros_varying_like((rows, n), dtype, *like)
    with jax.named_scope("block_gmm"):  # profiles find the expert GEMM by this name
        return lax.fori_loop(0, num_groups, group, out)


def _loop_gmm(xs, w, tile_group, used):
    """out[t] = xs[t] @ w[g(t)] by groups, then chunks of their tiles; zero rows past `used`."""

    def weight(g):
        return lax.dynamic_index_in_dim(w, g, keepdims=False).astype(xs.dtype)  # [K, N]

    def product(w_g, row, size):
        x_c = lax.dynamic_slice_in_dim(xs, row, size)  # [size, K]
        return jnp.dot(x_c, w_g, preferred_element_type=jnp.float32).astype(xs.dtype)

    E, _, N = w.shape
    return _tile_products(xs.shape[0], N, E, tile_group, used, weight, product, (xs, w), xs.dtype)


@jax.custom_vjp
def _block_gmm(xs, w, tile_group, used):
    return _loop_gmm(xs, w, tile_group, used)


def _block_gmm_fwd(xs, w, tile_group, used):
    return _loop_gmm(xs, w, tile_group, used), (xs, w, tile_group, used)


def _loop_wgrad(xs, dy, tile_group, used, num_groups):
    """dw[g] = sum over g's tiles of xs_t^T dy_t, accumulated in FP32: [E, K, N] float32."""
    T = tile_group.shape[0]
    b = xs.shape[0] // T
    start, end = _group_tiles(tile_group, used, num_groups)
    sizes = _chunk_sizes(T, num_groups)
    shape = (num_groups, xs.shape[1], dy.shape[1])

    def group(g, dw):
        def chunk(row, size, acc):
            x_c = lax.dynamic_slice_in_dim(xs, row, size)
            dy_c = lax.dynamic_slice_in_dim(dy, row, size)
            return acc + jnp.dot(x_c.T, dy_c, preferred_element_type=jnp.float32)

        acc = _over_chunks(
            start[g], end[g], b, sizes, chunk, zeros_varying_like(shape[1:], jnp.float32, xs, dy)
        )
        return lax.dynamic_update_index_in_dim(dw, acc, g, 0)

    with jax.named_scope("block_gmm"):
        return lax.fori_loop(0, num_groups, group, zeros_varying_like(shape, jnp.float32, xs, dy))


def _block_gmm_bwd(res, dy):
    xs, w, tile_group, used = res
    dy = dy.astype(xs.dtype)
    # dy @ w[g]^T, in xs.dtype (one transposed copy of w: folding the transpose into each
    # product measured 2% slower)
    dx = _loop_gmm(dy, w.transpose(0, 2, 1), tile_group, used)
    dw = _loop_wgrad(xs, dy, tile_group, used, w.shape[0])
    return dx, dw.astype(w.dtype), None, None


_block_gmm.defvjp(_block_gmm_fwd, _block_gmm_bwd)


def block_gmm(xs: jax.Array, w: jax.Array, layout: BlockLayout) -> jax.Array:
    """Tile-wise grouped product out[t] = xs[t] @ w[g(t)], differentiable (custom VJP).

    A loop over groups and, inside, over the group's tiles: XLA:CPU runs one [b, K] x [K, N]
    matmul per step much faster than the same work as a batched matmul over gathered weights
    (at the CPU benchmark's shape, as fast as one dense product of equal FLOPs), and tiles past
    the last one in use are skipped, so the work is the routed rows plus each group's padding
    to a whole tile.

    Args:
      xs: [P, K] slots, P = T * block, tiles of one group each (`dispatch`).
      w: [E, K, N] in xs.dtype, or FP32 master weights under a lower-precision xs: each tile's
        weight is cast to xs.dtype for the product, and the weight gradient accumulates in FP32
        and is returned in w.dtype (V3 Sec. 3.3.3: FP32 weight gradients, never rounded to BF16).
      layout: the `block_layout` that placed the rows.
    Returns:
      [P, N] in xs.dtype (fp32 accumulation); zero rows for padding slots.
    """
    if xs.ndim != 2 or w.ndim != 3 or xs.shape[1] != w.shape[1]:
        raise ValueError(f"xs must be [P, K] and w [E, K, N], got xs{xs.shape} and w{w.shape}")
    (T,) = layout.tile_group.shape
    if xs.shape[0] != T * layout.block:
        raise ValueError(f"xs rows {xs.shape[0]} must equal {T} tiles x block {layout.block}")
    if xs.dtype != w.dtype and w.dtype != jnp.float32:
        raise TypeError(f"xs.dtype={xs.dtype} must equal w.dtype={w.dtype} (or w be float32)")
    return _block_gmm(xs, w, layout.tile_group, layout.tiles_used)


# ----------------------------------------------------------------------------------------------
# The per-tile product in FP8 (DeepSeek-V3 recipe, Sec. 3.3).
# ----------------------------------------------------------------------------------------------


def _loop_gmm_scaled(xq, x_scale, group_weight, num_groups, n, tile_group, used, like, out_dtype):
    """The FP8 block-scaled product on the tile layout, formed as `grouped_matmul.gmm` forms it:

        out[t] = sum over contraction blocks i of (xq[t, i] @ w_q[g, i]) * x_scale[t, i] * s[g, i]

    The E4M3 values are multiplied exactly (in FP32) block by block and each block's sum is
    scaled, so the result hardly depends on the order of the sums: two programs forming the same
    product (the served weights and their training-recipe twin) agree to an ulp, where products
    of dequantized operands differ by FP32 rounding that flips later E4M3 roundings.

    Args:
      xq: [P, C] E4M3, C a multiple of the block; x_scale: [P, C / block] fp32.
      group_weight: g -> (w_q [C, n] E4M3, s [C / block, n] fp32 per output column).
    """
    cb = x_scale.shape[1]
    block = xq.shape[1] // cb

    def weight(g):
        w_q, w_s = group_weight(g)
        return w_q.astype(jnp.float32).reshape(cb, block, n), w_s

    def product(operand, row, size):
        w_g, s_g = operand
        x_c = lax.dynamic_slice_in_dim(xq, row, size).astype(jnp.float32).reshape(size, cb, block)
        s_c = lax.dynamic_slice_in_dim(x_scale, row, size)  # [size, cb]
        parts = jnp.einsum("skb,kbn->ksn", x_c, w_g, preferred_element_type=jnp.float32)
        return jnp.sum(parts * s_c.T[:, :, None] * s_g[:, None, :], axis=0).astype(out_dtype)

    rows = xq.shape[0]
    return _tile_products(rows, n, num_groups, tile_group, used, weight, product, like, out_dtype)


def _quantize_pieces(a, sizes, block_size, power_of_two_scale):
    """a [P, sum(sizes)] in E4M3, 1 x block tiles along each column piece apart (as separate
    products would quantize it), each piece zero-padded to whole blocks: (E4M3 [P, C], fp32
    scales [P, C / block])."""
    pieces = jnp.split(a, list(itertools.accumulate(sizes))[:-1], axis=1)
    q, s = zip(
        *(
            quantize_activation(
                pad_to_multiple(p, 1, block_size),
                block_size=block_size,
                power_of_two_scale=power_of_two_scale,
            )
            for p in pieces
        ),
        strict=True,
    )
    return jnp.concatenate(q, axis=1), jnp.concatenate(s, axis=1)


def _group_weight(q, block_size, *, transposed=False):
    """g -> expert g's quantized weights [(E4M3 [E, K, N_i], block scales)...] side by side, as
    `_loop_gmm_scaled` takes them. Forward: (E4M3 [Kp, sum N_i], per-column scales
    [Kp / block, sum N_i]), K zero-padded to whole blocks. Transposed (the dgrad): each piece's
    N_i zero-padded to whole blocks and stacked along it: (E4M3 [sum Np_i, K], [sum Nb_i, K])."""

    def weight(g):
        parts = []
        for wq, ws in q:
            wq_g = lax.dynamic_index_in_dim(wq, g, keepdims=False)  # [K, N_i]
            ws_g = lax.dynamic_index_in_dim(ws, g, keepdims=False)  # [Kb, Nb_i]
            if transposed:
                wq_g, ws_g = wq_g.T, ws_g.T
            scale = repeat_scale(ws_g, wq_g.shape[1], block_size=block_size, axis=1)
            parts.append((pad_to_multiple(wq_g, 0, block_size), scale))
        axis = 0 if transposed else 1
        return tuple(jnp.concatenate(x, axis=axis) for x in zip(*parts, strict=True))

    return weight


def _fp8_forward(xs, q, tile_group, used, block_size, power_of_two_scale, like):
    """xs (quantized here in 1 x block tiles) times the quantized weights q = ((E4M3 [E, K, N_i],
    block scales), ...), their products side by side: [P, sum N_i] in xs.dtype."""
    xq, x_scale = _quantize_pieces(xs, (xs.shape[1],), block_size, power_of_two_scale)
    n = sum(wq.shape[2] for wq, _ in q)
    weight = _group_weight(q, block_size)
    E = q[0][0].shape[0]
    return _loop_gmm_scaled(xq, x_scale, weight, E, n, tile_group, used, like, xs.dtype)


def _block_gmm_fp8_fwd(xs, ws, tile_group, used, w_dtypes, block_size, power_of_two_scale):
    del w_dtypes
    q = tuple(
        quantize_weight(w, block_size=block_size, power_of_two_scale=power_of_two_scale) for w in ws
    )  # per expert 128 x 128 blocks, each weight on its own grid
    out = _fp8_forward(xs, q, tile_group, used, block_size, power_of_two_scale, (xs, *ws))
    return out, (xs, q, tile_group, used)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _block_gmm_fp8(xs, ws, tile_group, used, w_dtypes, block_size, power_of_two_scale):
    args = (w_dtypes, block_size, power_of_two_scale)
    return _block_gmm_fp8_fwd(xs, ws, tile_group, used, *args)[0]


def _block_gmm_fp8_bwd(w_dtypes, block_size, power_of_two_scale, res, dy):
    xs, q, tile_group, used = res
    sizes = tuple(wq.shape[2] for wq, _ in q)
    # Dgrad: dy in 1 x 128 tiles along N (each weight's columns apart) against the forward's
    # FP8 weights, transposed.
    dyq, dy_scale = _quantize_pieces(dy, sizes, block_size, power_of_two_scale)
    num_groups, k = q[0][0].shape[0], xs.shape[1]
    dx = _loop_gmm_scaled(
        dyq,
        dy_scale,
        _group_weight(q, block_size, transposed=True),
        num_groups,
        k,
        tile_group,
        used,
        (xs, dy, *itertools.chain(*q)),
        xs.dtype,
    )
    # Wgrad contracts over the rows: xs and dy in 128 x 1 tiles along them, aligned to the padded
    # layout (a 128-row tile may span tiles of two groups, as in grouped_matmul_fp8). Rows past
    # the tiles in use are zeroed first so they cannot inflate a tile's amax.
    live = (jnp.arange(xs.shape[0]) < used * (xs.shape[0] // tile_group.shape[0]))[:, None]
    quant_rows = functools.partial(
        quantize_dequantize_activation,
        block_size=block_size,
        axis=0,
        power_of_two_scale=power_of_two_scale,
    )
    x_rows = quant_rows(jnp.where(live, xs, 0))
    dy_rows = quant_rows(jnp.where(live, dy, 0))
    dw = _loop_wgrad(x_rows, dy_rows, tile_group, used, num_groups)  # [E, K, sum N] FP32
    dws = jnp.split(dw, list(itertools.accumulate(sizes))[:-1], axis=-1)
    return dx, tuple(d.astype(t) for d, t in zip(dws, w_dtypes, strict=True)), None, None


_block_gmm_fp8.defvjp(_block_gmm_fp8_fwd, _block_gmm_fp8_bwd)


def _check_tiles(xs, w, layout: BlockLayout) -> tuple[jax.Array, ...]:
    """The FP8 tile products' weights as a tuple, after checking xs [P, K] against each [E, K, N]
    and P against the layout; errors name the offending operand."""
    ws = (w,) if isinstance(w, jax.Array) else tuple(w)
    for i, wi in enumerate(ws):
        if xs.ndim != 2 or wi.ndim != 3 or xs.shape[1] != wi.shape[1]:
            raise ValueError(
                f"xs must be [P, K] and w[{i}] [E, K, N], got xs{xs.shape} and w{wi.shape}"
            )
    if len({wi.shape[0] for wi in ws}) != 1:
        raise ValueError(f"the weights disagree on the expert count: {[wi.shape for wi in ws]}")
    (T,) = layout.tile_group.shape
    if xs.shape[0] != T * layout.block:
        raise ValueError(f"xs rows {xs.shape[0]} must equal {T} tiles x block {layout.block}")
    return ws


def block_gmm_fp8(
    xs: jax.Array,
    w: jax.Array | Sequence[jax.Array],
    layout: BlockLayout,
    *,
    block_size: int = DEFAULT_BLOCK,
    power_of_two_scale: bool = False,
) -> jax.Array:
    """`block_gmm` under the DeepSeek-V3 FP8 recipe, differentiable (custom VJP).

    The same products as `grouped_matmul_fp8` with the rows in the padded tile layout:
    forward, xs in 1 x 128 tiles against each expert's weight in 128 x 128 blocks; dgrad, dy in
    1 x 128 tiles against the forward's FP8 weights; wgrad, xs and dy in 128 x 1 tiles along the
    rows, FP32 accumulation, returned in w's dtype. Forward and dgrad multiply the E4M3 values
    exactly block by block and scale each block's sum (`_loop_gmm_scaled`, as the grouped kernel
    does); the wgrad multiplies the dequantized row tiles in FP32 (as `grouped_matmul.tgmm` does).
    On a CPU, where no FP8 matmul exists, this keeps the work at the routed FLOPs plus padding,
    where `grouped_matmul_fp8`'s `ragged_dot` costs E times them.
    `grouped_matmul_fp8` over the padded rows (group sizes = tiles per group x block) is its twin,
    held equal forward and VJP by tests/kernels/test_block_grouped_matmul.py.

    Args:
      xs: [P, K] slots in tiles of one group each (`dispatch`), bf16/fp32.
      w: [E, K, N] expert weights (bf16/fp32), or a tuple of them (e.g. gate and up projections):
        each is quantized on its own block grid and their products come back side by side along
        N, from one product per tile.
      layout: the `block_layout` that placed the rows.
      block_size: the quantization block (128 in V3).
      power_of_two_scale: round every scale up to a power of two.
    Returns:
      [P, sum N] in xs.dtype; zero rows for padding slots. dx in xs.dtype, dw in each w's dtype.
    """
    ws = _check_tiles(xs, w, layout)
    w_dtypes = tuple(jnp.dtype(wi.dtype) for wi in ws)
    return _block_gmm_fp8(
        xs, ws, layout.tile_group, layout.tiles_used, w_dtypes, block_size, power_of_two_scale
    )


def block_gmm_stored_fp8(
    xs: jax.Array,
    w_fp8: jax.Array | Sequence[jax.Array],
    w_scale: jax.Array | Sequence[jax.Array],
    layout: BlockLayout,
    *,
    block_size: int,
) -> jax.Array:
    """Tile-wise product with expert weights kept in E4M3 as stored (serving; no VJP).

    xs in 1 x block_size tiles (quantized on the fly) against expert g's stored weight, which is
    widened to FP32 when g's tiles run: one [K, N] copy at a time, never the whole [E, K, N].
    The E4M3 values are multiplied exactly block by block and each block's sum scaled
    (`_loop_gmm_scaled`); `grouped_matmul.gmm` with the scales over the padded rows is its twin,
    and `block_gmm_fp8` over the dequantized weights runs the same arithmetic.

    Args:
      xs: [P, K] slots in tiles of one group each (`dispatch`), bf16/fp32.
      w_fp8: [E, K, N] float8_e4m3fn, or a tuple of them (e.g. gate and up projections), whose
        products come back side by side along N from one product per tile.
      w_scale: [E, ceil(K / block_size), ceil(N / block_size)] fp32 block scales (a tuple
        matching w_fp8's).
      layout: the `block_layout` that placed the rows.
      block_size: the quantization block of the weights and of the activation tiles.
    Returns:
      [P, sum N] in xs.dtype; zero rows for padding slots.
    """
    datas = _check_tiles(xs, w_fp8, layout)
    scales = (w_scale,) if isinstance(w_scale, jax.Array) else tuple(w_scale)
    q = tuple(zip(datas, scales, strict=True))
    like = (xs, *datas, *scales)
    return _fp8_forward(xs, q, layout.tile_group, layout.tiles_used, block_size, False, like)
