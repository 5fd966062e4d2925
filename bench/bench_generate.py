"""Generation throughput and latent-cache size/accuracy, ours against transformers `generate`.

One run prints markdown tables (paste into docs/benchmarks.md):
  1. prefill and decode tokens/s of `deepseek_jax.generate` (greedy) at batch 1, 8 and 32
     (prompt length `--prompt-len`, `--new` new tokens; the second of two identical calls is
     timed, so compilation is excluded) and the same shape through transformers'
     DeepseekV3ForCausalLM.generate (PyTorch CPU, random weights of the same architecture;
     decode rate = B x (new - 1) / (t(new) - t(1 new token)));
  2. cache bytes per token (all layers): BF16 latent (C + R), 8-bit latent (+ two fp32 scales)
     and the full per-head K/V a standard-attention model of the same shape would cache, for the
     benchmarked model and the published V2-Lite / V3 configs;
  3. the 8-bit caches' accuracy cost against the full-precision cache: max |logit error| over a
     teacher-forced `--agree` token continuation and greedy agreement over `--agree` tokens.

    python bench/bench_generate.py                       # v3-small (no MTP), fp32, CPU
    python bench/bench_generate.py --batches 1 64 --dtype bfloat16 --preset deepseek-v2-lite-16b \
        --set num_hidden_layers=4 --no-hf                 # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.inference import generate
from deepseek_jax.model import DeepSeekModel


def cache_bytes_per_token(cfg, layers: int | None = None) -> dict[str, float]:
    L = cfg.num_hidden_layers if layers is None else layers
    C, R, N = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    return {
        "latent_bf16": L * (C + R) * 2,
        "latent_8bit": L * ((C + R) * 1 + 2 * 4),
        "full_kv_bf16": L * N * (cfg.qk_nope_head_dim + R + cfg.v_head_dim) * 2,
    }


def _prompts(vocab, B, T, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, (B, T)).tolist()


def bench_ours(model, batches, T, new):
    rows = []
    for B in batches:
        prompts = _prompts(model.cfg.vocab_size, B, T)
        generate(model, prompts, max_new_tokens=new)  # compile
        res = generate(model, prompts, max_new_tokens=new)
        s = res.stats
        rows.append((B, s["prefill_tokens_per_s"], s["decode_tokens_per_s"], s["compilations"]))
    return rows


def _hf_model(cfg):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.routed_scaling_factor,
        first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(hf_cfg).eval()


def bench_hf(cfg, batches, T, new):
    import torch

    model = _hf_model(cfg)
    rows = []

    def run(ids, n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t0

    for B in batches:
        ids = torch.tensor(_prompts(cfg.vocab_size, B, T))
        run(ids, 2)  # warm-up
        t1, tn = run(ids, 1), run(ids, new)
        rows.append((B, B * T / t1, B * (new - 1) / max(tn - t1, 1e-9)))
    return rows


def cache_accuracy(model, T, n, dtypes=("int8", "float8_e4m3fn")):
    """(dtype, max |logit err|, max |logit|, greedy agreement, first divergence) per dtype."""
    prompt = _prompts(model.cfg.vocab_size, 1, T, seed=1)
    ref = generate(model, prompt, max_new_tokens=n)
    seq = jnp.asarray([prompt[0] + ref.tokens[0]], jnp.int32)  # teacher-forced continuation
    pos = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
    full, _ = model.decode(seq, model.init_cache(1, seq.shape[1]), pos)
    out = []
    for dt in dtypes:
        q, _ = model.decode(seq, model.init_cache(1, seq.shape[1], jnp.dtype(dt)), pos)
        err = float(jnp.abs(q - full)[:, T - 1 :].max())
        res = generate(model, prompt, max_new_tokens=n, cache_dtype=dt)
        a, b = np.array(res.tokens[0]), np.array(ref.tokens[0])
        diverge = int(np.argmax(a != b)) if (a != b).any() else n
        forced = np.asarray(jnp.argmax(q[0, T - 1 : -1], -1)) == b  # teacher-forced argmax
        out.append((dt, err, float(jnp.abs(full).max()), float(forced.mean()), diverge))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="v3-small")
    p.add_argument("--set", nargs="*", default=[], help="ModelConfig overrides key=value")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--agree", type=int, default=64)
    p.add_argument("--no-hf", action="store_true")
    args = p.parse_args()
    overrides = {"num_nextn_predict_layers": 0, "dtype": args.dtype}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = type(getattr(load_preset(args.preset), k))(v)
    cfg = load_preset(args.preset).replace(**overrides)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    # Random init gives logits of ~0.1; scale the head so greedy choices are O(1) apart.
    model.lm_head[...] = model.lm_head[...] * (cfg.hidden_size**0.5 / 4)
    dev = jax.devices()[0]
    print(
        f"## {time.strftime('%Y-%m-%d')} {args.preset} ({cfg.dtype}), "
        f"{dev.platform} {getattr(dev, 'device_kind', '')} {platform.processor()}, "
        f"prompt {args.prompt_len}, {args.new} new tokens\n"
    )
    ours = bench_ours(model, args.batches, args.prompt_len, args.new)
    hf = None if args.no_hf else bench_hf(cfg, args.batches, args.prompt_len, args.new)
    print("| batch | ours prefill tok/s | ours decode tok/s | HF prefill tok/s | HF decode tok/s |")
    print("|---|---|---|---|---|")
    for i, (B, pre, dec, _) in enumerate(ours):
        h = ("-", "-") if hf is None else (f"{hf[i][1]:.0f}", f"{hf[i][2]:.0f}")
        print(f"| {B} | {pre:.0f} | {dec:.0f} | {h[0]} | {h[1]} |")
    print("\n| model | latent BF16 B/token | 8-bit latent B/token | full K/V BF16 B/token |")
    print("|---|---|---|---|")
    for name, c in (
        (args.preset, cfg),
        ("deepseek-v2-lite-16b", load_preset("deepseek-v2-lite-16b")),
        ("deepseek-v3-671b", load_preset("deepseek-v3-671b")),
    ):
        b = cache_bytes_per_token(c)
        print(
            f"| {name} | {b['latent_bf16']:,} | {b['latent_8bit']:,} "
            f"({b['latent_8bit'] / b['latent_bf16']:.0%}) | {b['full_kv_bf16']:,} "
            f"(latent = {b['latent_bf16'] / b['full_kv_bf16']:.1%}) |"
        )
    print("\n| cache | max abs logit err (max abs logit) | greedy agreement (forced) | diverges |")
    print("|---|---|---|---|")
    for dt, err, scale, agree, div in cache_accuracy(model, args.prompt_len, args.agree):
        print(f"| {dt} | {err:.2e} ({scale:.1f}) | {agree:.1%} | {div} / {args.agree} |")


if __name__ == "__main__":
    main()
