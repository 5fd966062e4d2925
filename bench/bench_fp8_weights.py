"""FP8 serving weights: memory, and the accuracy cost against the dequantized BF16 model.

Writes a tiny random hub checkpoint in DeepSeek-V3/R1's FP8 layout (decoder linears as
float8_e4m3fn + float32 `weight_scale_inv` per 128x128 block; dims span several blocks), then
loads it twice:
  * served - `load_pretrained(path, dtype, weights="fp8")`: linears stay FP8 and run through the
             FP8 block-scaled matmul / grouped GEMM, activations quantized 1x128 on the fly;
  * dense  - `load_pretrained(path, dtype)`: the same weights dequantized, plain BF16 products.
Reports weight bytes (also for the full 671B config, computed from the parameter maps), the
teacher-forced logit error and greedy next-token agreement over B x T positions, and greedy
decoding through the latent cache (`model.decode`) of both models.

    python bench/bench_fp8_weights.py            # the numbers in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import fp8_weights, load_pretrained
from deepseek_jax.config import ModelConfig, load_preset
from deepseek_jax.hf.mapping import param_maps
from deepseek_jax.hf.safetensors_io import Fp8Format, quantize, save_file

BLOCK = 128
CONFIG = dict(
    model_type="deepseek_v3",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=384,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=192,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=0,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def write_fp8_checkpoint(directory: str, seed: int = 0) -> None:
    """Random O(1)-logit weights (matrices N(0, 1/fan_in)); decoder linears stored as block FP8."""
    cfg = ModelConfig.from_dict(dict(CONFIG))
    rng = np.random.default_rng(seed)
    tensors = {}
    for pm in param_maps(cfg):
        for _, name in pm.pieces():
            shape = pm.hub_shape
            if pm.fp32:
                w = 0.3 * rng.standard_normal(shape)
            elif len(shape) == 1:
                w = 1 + 0.2 * rng.standard_normal(shape)
            else:
                std = 1.0 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5
                w = std * rng.standard_normal(shape)
            w = w.astype(np.float32)
            if pm.quantizable:
                tensors[name], tensors[name + "_scale_inv"] = quantize(w, (BLOCK, BLOCK))
            else:
                tensors[name] = w
    raw = dict(CONFIG, quantization_config=Fp8Format((BLOCK, BLOCK)).to_config())
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def config_weight_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(FP8 serving bytes, BF16 bytes) of every parameter of `cfg`, from the parameter maps."""
    fp8 = bf16 = 0
    for pm in param_maps(cfg):
        n = int(np.prod(pm.shape))
        bf16 += 2 * n
        if pm.quantizable:
            blocks = -(-pm.hub_shape[0] // BLOCK) * -(-pm.hub_shape[1] // BLOCK)
            fp8 += n + 4 * blocks * int(np.prod(pm.stack_shape))
        else:
            fp8 += 4 * n if pm.fp32 else 2 * n
    return fp8, bf16


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, prompt, steps: int):
    """Prompt token by token through the latent cache, then `steps` greedy tokens."""
    model = nnx.merge(graphdef, state)
    B, T = prompt.shape
    padded = jnp.pad(prompt, ((0, 0), (0, steps + 1)))

    def step(carry, i):
        caches, tok = carry
        logits, caches = model.decode(tok[:, None], caches, jnp.full((B, 1), i, jnp.int32))
        greedy = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        nxt = jnp.where(i + 1 < T, padded[:, i + 1], greedy)
        return (caches, nxt), nxt

    caches = model.init_cache(B, T + steps)
    _, fed = jax.lax.scan(step, (caches, prompt[:, 0]), jnp.arange(T + steps))
    return fed.T[:, T - 1 : T - 1 + steps]


def run(path: str, dtype, batch: int, seq: int, prompt: int, steps: int) -> dict:
    served = load_pretrained(path, dtype, weights="fp8")
    dense = load_pretrained(path, dtype)  # dequantized, weights in `dtype`
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (batch, seq)))
    ids = ids.astype(jnp.int32)
    t0 = time.perf_counter()
    a = np.asarray(_forward(*nnx.split(served), ids))
    b = np.asarray(_forward(*nnx.split(dense), ids))
    ga = np.asarray(_greedy(*nnx.split(served), ids[:, :prompt], steps))
    gb = np.asarray(_greedy(*nnx.split(dense), ids[:, :prompt], steps))
    same = ga == gb
    first_diff = np.where(same.all(1), steps, np.argmin(same, 1))  # per row
    return {
        "dtype": jnp.dtype(dtype).name,
        "max_abs_logit_err": float(np.abs(a - b).max()),
        "mean_abs_logit_err": float(np.abs(a - b).mean()),
        "logit_std": float(b.std()),
        "next_token_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "positions": batch * seq,
        "decode_token_agreement": float(same.mean()),
        "decode_identical_prefix_mean": float(first_diff.mean()),
        "decode_rows": batch,
        "decode_steps": steps,
        "bytes": {
            "served": fp8_weights.weight_bytes(served),
            "dense": fp8_weights.weight_bytes(dense),
        },
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_fp8_checkpoint(tmp)
        for dtype in (jnp.bfloat16, jnp.float32):
            r = run(tmp, dtype, args.batch, args.seq, args.prompt, args.steps)
            print(json.dumps(r), flush=True)
    for preset in ("deepseek-v3-671b",):
        fp8, bf16 = config_weight_bytes(load_preset(preset))
        print(json.dumps({"preset": preset, "fp8_serving_GB": fp8 / 1e9, "bf16_GB": bf16 / 1e9}))


if __name__ == "__main__":
    main()
