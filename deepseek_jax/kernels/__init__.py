"""FP8 and grouped-matmul kernels, installed as `deepseek_jax.kernels` (see pyproject package-dir).

Modules (import them directly; nothing is re-exported here so importing the package stays cheap):
  quant           E4M3 fine-grained quantization: 1x128 activation tiles, 128x128 weight blocks.
  fp8_matmul      block-scaled FP8 matmul (`fp8_matmul`) and the differentiable `fp8_linear`.
  grouped_matmul  grouped expert GEMM (`gmm`, `tgmm`) and the differentiable `grouped_matmul`,
                  `grouped_matmul_fp8`.
  backend         `BlockSizes` and the impl="auto"|"xla"|"pallas"|"triton" dispatch rules.
Pallas kernels live in pallas_*.py, the optional jax-triton kernel in triton_fp8_matmul.py, and
the grouped references in grouped_matmul_reference.py.
"""
