"""Checkpoint conversion throughput (MB/s) and peak host memory (RSS).

Writes a synthetic hub-layout checkpoint of a mid-size DeepSeek-V3-shaped model (random bf16
bits, or block-FP8 weights with --fp8) of about --size-gb, then runs, each in a fresh process
so that its peak RSS is its own:
  * baseline     - only the imports (jax, tensorstore, deepseek_jax): the RSS floor;
  * hf-to-orbax  - `deepseek_jax.convert.hf_to_orbax`;
  * orbax-to-hf  - `deepseek_jax.convert.orbax_to_hf` back to safetensors shards.
Throughput is source checkpoint bytes / wall seconds (FP8: the FP8 bytes read).

    python bench/bench_convert.py                  # ~0.25 GB, quick
    python bench/bench_convert.py --size-gb 2      # the number quoted in docs/benchmarks.md
    python bench/bench_convert.py --size-gb 2 --fp8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _config(size_bytes: int, fp8: bool) -> dict:
    """A V3-shaped config whose layer count makes the checkpoint about `size_bytes`."""
    base = dict(
        model_type="deepseek_v3",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=512,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
    )
    if fp8:
        base["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    per_layer = _total_bytes(dict(base, num_hidden_layers=3)) - _total_bytes(
        dict(base, num_hidden_layers=2)
    )
    fixed = _total_bytes(dict(base, num_hidden_layers=2)) - 2 * per_layer
    base["num_hidden_layers"] = max(2, round((size_bytes - fixed) / per_layer))
    return base


def _planned(raw: dict):
    """Hub tensors of `raw` in hub order: [(name, dtype code, shape, source name)]."""
    from deepseek_jax.config import ModelConfig
    from deepseek_jax.hf.mapping import hub_order, mtp_copies, param_maps
    from deepseek_jax.hf.safetensors_io import Fp8Format

    cfg = ModelConfig.from_dict(raw)
    fp8 = Fp8Format.from_config(raw, "bench")
    out = []
    for name, pm, _ in hub_order(param_maps(cfg)):
        if fp8 is not None and pm.quantizable:
            out.append((name, "F8_E4M3", pm.hub_shape, name))
            out.append((name + "_scale_inv", "F32", fp8.scale_shape(pm.hub_shape), None))
        else:
            out.append((name, "F32" if pm.fp32 else "BF16", pm.hub_shape, name))
    V, D = cfg.vocab_size, cfg.hidden_size
    for name, main in mtp_copies(cfg).items():
        out.append((name, "BF16", (V, D), main))  # same seed -> same bits as the main tensor
    return out


def _total_bytes(raw: dict) -> int:
    from deepseek_jax.hf.safetensors_io import DTYPES

    return sum(int(np.prod(s)) * DTYPES[d].itemsize for _, d, s, _ in _planned(raw))


def _data(code: str, shape, source: str | None) -> np.ndarray:
    """Random finite values: bf16/fp8 bit patterns with the top exponent bit cleared."""
    import ml_dtypes

    seed = abs(hash(source)) % 2**32 if source else 0
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if code == "BF16":
        bits = rng.integers(0, 2**16, n, dtype=np.uint16) & 0xBFFF  # |x| < 2
        return bits.view(ml_dtypes.bfloat16).reshape(shape)
    if code == "F8_E4M3":
        bits = rng.integers(0, 2**8, n, dtype=np.uint8) & 0xB7  # no NaN (0x7F/0xFF)
        return bits.view(ml_dtypes.float8_e4m3fn).reshape(shape)
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)


def write_checkpoint(directory: str, raw: dict, shard_bytes: int = 10**9) -> int:
    """Streams a synthetic checkpoint to disk (one tensor in memory at a time). Returns bytes."""
    from deepseek_jax.hf import safetensors_io as st

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    planned = _planned(raw)
    groups = [[st.PlannedTensor(n, d, tuple(s))] for n, d, s, _ in planned]
    shards = st.plan_shards(groups, shard_bytes)
    files = st.shard_names(len(shards))
    source = {n: src for n, _, _, src in planned}
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        writer = st.ShardWriter(os.path.join(directory, file), shard, {"format": "pt"})
        for t in shard:
            writer.write(t.name, _data(t.dtype, t.shape, source[t.name]))
            weight_map[t.name] = file
        writer.close()
    total = sum(t.nbytes for s in shards for t in s)
    if len(files) > 1:
        st.write_index(directory, weight_map, total)
    return total


def _child(args) -> None:
    """Runs one measured step in this (fresh) process and prints a JSON line."""
    import warnings

    warnings.simplefilter("ignore")
    import jax

    import deepseek_jax.convert as convert  # noqa: F401  (the imports are the baseline)

    jax.devices()  # backend start-up belongs to the baseline
    t0 = time.perf_counter()
    if args.child != "baseline":  # as users run it: the command line
        rc = convert.main([args.child, args.src, args.dst, "--no-progress"])
        if rc:
            raise SystemExit(rc)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"step": args.child, "seconds": seconds, "peak_rss": peak}))


def _run(step: str, src: str = "", dst: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, "--src", src, "--dst", dst]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=0.25, help="synthetic checkpoint size")
    p.add_argument("--fp8", action="store_true", help="block-FP8 linear weights (V3/R1 style)")
    p.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default="", help=argparse.SUPPRESS)
    p.add_argument("--dst", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    try:
        raw = _config(int(args.size_gb * 1e9), args.fp8)
        hub, orb, back = (os.path.join(work, n) for n in ("hub", "orbax", "back"))
        t0 = time.perf_counter()
        size = write_checkpoint(hub, raw)
        gen = time.perf_counter() - t0
        largest = max(
            int(np.prod(s)) * (1 if d == "F8_E4M3" else 2) for _, d, s, _ in _planned(raw)
        )
        print(
            f"synthetic checkpoint: {size / 1e9:.2f} GB, {raw['num_hidden_layers']} layers "
            f"(+1 MTP), {'FP8' if args.fp8 else 'BF16'}, largest tensor {largest / 1e6:.0f} MB, "
            f"written in {gen:.1f} s"
        )
        results = [_run("baseline"), _run("hf-to-orbax", hub, orb), _run("orbax-to-hf", orb, back)]
        base = results[0]["peak_rss"]
        for r in results:
            mbps = size / 1e6 / r["seconds"] if r["step"] != "baseline" else float("nan")
            print(
                f"{r['step']:>12}: {r['seconds']:7.2f} s  {mbps:8.1f} MB/s  "
                f"peak RSS {r['peak_rss'] / 2**20:7.0f} MiB (+{(r['peak_rss'] - base) / 2**20:.0f}"
                " over baseline)"
            )
        print(json.dumps({"size_bytes": size, "fp8": args.fp8, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
