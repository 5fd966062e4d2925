"""jax-triton twin of the Pallas FP8 block-scaled matmul (GPU only, optional dependency).

Same algorithm as pallas_fp8_matmul.py, but written directly in Triton so ragged edges are
handled with masked loads instead of padded copies. Imported lazily by fp8_matmul.py only when
`impl="triton"` and both `triton` and `jax_triton` are importable; it is not exercised by the CPU
test suite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton
import triton.language as tl

from .backend import BlockSizes, cdiv


@triton.jit
def _kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    o_ptr,
    M: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + rk
        a = tl.load(
            x_ptr + rm[:, None] * K + k[None, :],
            mask=(rm[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            w_ptr + k[:, None] * N + rn[None, :],
            mask=(k[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )
        sa = tl.load(xs_ptr + rm * KB + kb, mask=rm < M, other=0.0)
        sb = tl.load(ws_ptr + kb * N + rn, mask=rn < N, other=0.0)
        # FP8 tensor-core product, promoted to fp32 with both scales once per K block.
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    tl.store(
        o_ptr + rm[:, None] * N + rn[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def fp8_matmul_triton(
    x: jax.Array,
    x_scale: jax.Array,
    w: jax.Array,
    w_scale_cols: jax.Array,
    *,
    out_dtype: jnp.dtype,
    block_sizes: BlockSizes,
) -> jax.Array:
    """x [M, K] fp8, x_scale [M, Kb], w [K, N] fp8, w_scale_cols [Kb, N] -> [M, N] out_dtype."""
    m, k = x.shape
    n = w.shape[1]
    bm, bn, bk = block_sizes.block_m, block_sizes.block_n, block_sizes.block_k
    return jt.triton_call(
        x,
        x_scale.astype(jnp.float32),
        w,
        w_scale_cols.astype(jnp.float32),
        kernel=_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(cdiv(m, bm), cdiv(n, bn)),
        num_warps=4,
        num_stages=3,
        M=m,
        N=n,
        K=k,
        KB=cdiv(k, bk),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
