#!/usr/bin/env bash
# One prepared GPU check (bench/gpu_check.py): kernel correctness (Pallas / jax-triton FP8 matmul,
# grouped GEMM, forward and VJP), kernel benchmarks at V3 shapes, v3-1b train step MFU (BF16,
# FP8) and decode tokens/s -> one markdown table in ${OUT:-.}/gpu_check.md. Sized for <= 8 min
# on one H100/H200; a hard `timeout` keeps it there. Rows of a section that fails say so; where
# jax-triton is absent its row says "skipped".
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --smoke    # toy sizes, any machine (what the CPU test runs)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.md"
# Each section bounded on its own, so a slow one cannot eat the others' time.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
for section in correctness kernels train decode; do
  limit=120
  [ "$section" = train ] && limit=200
  timeout "$limit" python bench/gpu_check.py --sections "$section" --out "$out.$section" "$@" \
    || { echo "| $section section | timed out or crashed (exit $?) | - | FAIL |" > "$out.$section.err"; status=1; }
done
{
  head -n 4 "$out.correctness" 2>/dev/null || echo "| check | measured | goal | verdict |"
  for section in correctness kernels train decode; do
    tail -n +5 "$out.$section" 2>/dev/null
    cat "$out.$section.err" 2>/dev/null
  done
} > "$out"
rm -f "$out".*
cat "$out"
exit $status
