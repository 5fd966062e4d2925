"""Tiny DeepSeek-V2/V2-Lite/V3 checkpoints built with transformers (PyTorch CPU) for interop tests.

torch and transformers are imported lazily inside the fixtures so that collecting the rest of
the suite does not pay for them. Weights are re-drawn so that logits are O(1) (the default 0.02
init gives logits of ~0.1, which would make the 1e-4 parity bar meaningless), norms are not all
ones and the V3 selection bias is non-zero.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

VOCAB = 128
SEQ = 24
L = 3  # decoder layers; the MTP layer is model.layers.3


def _common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    base.update(kw)
    return base


def _yarn(mscale: float):
    return dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=16,
        beta_fast=32,
        beta_slow=1,
        mscale=mscale,
        mscale_all_dim=mscale,
    )


# name -> (model family, config kwargs, save options)
CONFIGS = {
    # V3: YaRN, group-limited noaux_tc routing, random selection bias, sharded, MTP layer.
    "v3": ("v3", dict(n_group=4, topk_group=2, n_shared_experts=1, rope_parameters=_yarn(1.0))),
    # V2: softmax group-limited greedy, no normalisation (what transformers' V2 gate does).
    "v2": (
        "v2",
        dict(
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_parameters=_yarn(0.707),
        ),
    ),
    # V2-Lite: no q compression, greedy routing, plain RoPE, one model.safetensors.
    "v2_lite": (
        "v2",
        dict(
            q_lora_rank=None,
            topk_method="greedy",
            n_group=None,
            topk_group=None,
            n_shared_experts=2,
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    # V3 stored in block FP8 (16x16 blocks so tiny matrices have several, some ragged), with the
    # half-split RoPE layout to exercise rope_interleave=False.
    "v3_fp8": (
        "v3",
        dict(
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            rope_interleave=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
}
FP8_BLOCK = (16, 16)


def randomize(model, seed: int) -> None:
    """Redraws every weight: norms 1 + N(0, .2), bias N(0, .3), matrices N(0, 1/fan_in)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_torch(name: str, seed: int = 0):
    """(transformers model in eval mode with random O(1) weights, its config)."""
    import torch
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    family, kw = CONFIGS[name]
    if family == "v3":
        cfg, cls = DeepseekV3Config(**_common(**kw)), DeepseekV3ForCausalLM
    else:
        cfg, cls = DeepseekV2Config(**_common(**kw)), DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize(model, seed + 1)
    return model, cfg


def mtp_tensors(state: dict, seed: int) -> dict:
    """Random MTP-layer tensors (model.layers.L.*) shaped like the last decoder layer's, plus
    the embedding/head copies the hub checkpoints carry."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    prefix = f"model.layers.{L - 1}."
    for k, v in state.items():
        if k.startswith(prefix):
            new = f"model.layers.{L}." + k[len(prefix) :]
            noise = torch.randn(v.shape, generator=g)
            if k.endswith("e_score_correction_bias"):
                out[new] = 0.3 * noise
            elif v.ndim == 1:
                out[new] = 1 + 0.2 * noise
            else:
                out[new] = v.shape[-1] ** -0.5 * noise
    D = state["model.norm.weight"].shape[0]
    out[f"model.layers.{L}.enorm.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
    out[f"model.layers.{L}.hnorm.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
    out[f"model.layers.{L}.shared_head.norm.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
    out[f"model.layers.{L}.eh_proj.weight"] = (2 * D) ** -0.5 * torch.randn(D, 2 * D, generator=g)
    out[f"model.layers.{L}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    out[f"model.layers.{L}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    return out


def hub_tensors(directory: str) -> dict:
    """Every tensor of a checkpoint folder as named on disk (read with the safetensors library;
    transformers' in-memory state_dict fuses the experts, its files do not)."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, file)))
    return out


def save_sharded(directory: str, tensors: dict, n_shards: int) -> None:
    """Writes tensors with the safetensors library as n shards + index (hub naming)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    names = list(tensors)
    parts = np.array_split(np.arange(len(names)), n_shards)
    weight_map = {}
    for i, part in enumerate(parts):
        file = (
            "model.safetensors"
            if n_shards == 1
            else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        )
        chunk = {names[j]: tensors[names[j]].contiguous() for j in part}
        save_file(chunk, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    if n_shards > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def quantize_fp8(w, block):
    """Test-side block FP8 quantizer (independent of deepseek_jax): -> (fp8, scale_inv)."""
    import torch

    R, C = w.shape
    b0, b1 = block
    scale = torch.ones(-(-R // b0), -(-C // b1))
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            amax = blk.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q, scale, block):
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


def is_fp8_linear(name: str, t) -> bool:
    return (
        t.ndim == 2
        and name.startswith("model.layers.")
        and name.endswith(("proj.weight", "proj_with_mqa.weight"))
        and ".mlp.gate." not in name
    )


class TinyCheckpoints:
    """Builds each tiny checkpoint once per session: folder, torch model and reference logits."""

    def __init__(self, root):
        self.root = root
        self._cache = {}
        self.ids = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)

    def get(self, name: str):
        if name not in self._cache:
            self._cache[name] = self._build(name)
        return self._cache[name]

    def _build(self, name: str):
        import torch

        model, cfg = build_torch(name)
        directory = str(self.root / name)
        if name == "v3":
            model.save_pretrained(directory, max_shard_size="40KB")  # many shards + index
            save_sharded_extra(directory, mtp_tensors(hub_tensors(directory), seed=7))
        elif name == "v3_fp8":
            model.save_pretrained(directory)
            tensors = {}
            for k, v in hub_tensors(directory).items():
                if is_fp8_linear(k, v):
                    q, s = quantize_fp8(v.float(), FP8_BLOCK)
                    tensors[k], tensors[k + "_scale_inv"] = q, s
                else:
                    tensors[k] = v
            save_sharded(directory, tensors, 1)
            # torch runs on the dequantized weights (loaded back through its own layout).
            deq = {
                k: dequantize_fp8(v, tensors[k + "_scale_inv"], FP8_BLOCK)
                if v.dtype == torch.float8_e4m3fn
                else v
                for k, v in tensors.items()
                if not k.endswith("_scale_inv")
            }
            save_sharded(str(self.root / "v3_fp8_dequantized"), deq, 1)
            cfg.save_pretrained(str(self.root / "v3_fp8_dequantized"))
            model = (
                type(model)
                .from_pretrained(str(self.root / "v3_fp8_dequantized"), config=cfg)
                .eval()
            )
            path = os.path.join(directory, "config.json")
            with open(path) as f:
                raw = json.load(f)
            raw["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK),
            }
            with open(path, "w") as f:
                json.dump(raw, f)
        else:
            model.save_pretrained(directory, max_shard_size="60KB" if name == "v2" else "50MB")
        with torch.no_grad():
            logits = model(torch.tensor(self.ids, dtype=torch.long)).logits.float().numpy()
        return directory, model, logits


def save_sharded_extra(directory: str, tensors: dict) -> None:
    """Adds tensors in a shard of their own and lists them in the index."""
    from safetensors.torch import save_file

    file = "model-mtp.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, file))
    path = os.path.join(directory, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    index["weight_map"].update(dict.fromkeys(tensors, file))
    with open(path, "w") as f:
        json.dump(index, f)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    return TinyCheckpoints(tmp_path_factory.mktemp("hf_tiny"))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def logits_of(model, ids) -> np.ndarray:
    """Jitted forward (compiled once per config): eager NNX calls cost seconds each."""
    graphdef, state = nnx.split(model)
    return np.asarray(_logits(graphdef, state, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="session")
def logits():
    return logits_of


def hub_config(**kw) -> dict:
    """A hub-style V3 config.json dict for synthetic checkpoints (no torch needed)."""
    out = _common(**kw)
    out.pop("attn_implementation")
    out.update(
        model_type="deepseek_v3",
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        rope_theta=10000.0,
        rope_scaling={"type": "yarn", **{k: v for k, v in _yarn(1.0).items() if "rope_" not in k}},
    )
    return out


def write_synthetic(directory, raw_config: dict, n_shards: int = 2, seed: int = 0) -> dict:
    """Random float32 hub-layout checkpoint for `raw_config` (names from our mapping: for error
    and I/O tests, not for parity). Returns {name: array}."""
    from deepseek_jax.config import ModelConfig
    from deepseek_jax.hf.mapping import mtp_copies, param_maps
    from deepseek_jax.hf.safetensors_io import save_file, write_index

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw_config, f)
    cfg = ModelConfig.from_dict(raw_config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for pm in param_maps(cfg):
        for _, name in pm.pieces():
            tensors[name] = rng.standard_normal(pm.hub_shape).astype(np.float32)
    for name, main in mtp_copies(cfg).items():
        tensors[name] = tensors[main].copy()
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), n_shards)):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, os.path.join(directory, file))
        weight_map.update({names[j]: file for j in part})
    write_index(str(directory), weight_map, sum(t.nbytes for t in tensors.values()))
    return tensors


@pytest.fixture(scope="session")
def synthetic():
    """write_synthetic(directory, raw_config=None, n_shards=2) -> {name: array} (V3 by default)."""

    def make(directory, raw_config=None, n_shards=2, seed=0):
        return write_synthetic(directory, raw_config or hub_config(), n_shards, seed)

    return make


@pytest.fixture(scope="session")
def torch_io():
    """hub_tensors(dir) / save_sharded(dir, tensors, n) through the safetensors library."""
    import types

    return types.SimpleNamespace(hub_tensors=hub_tensors, save_sharded=save_sharded)
