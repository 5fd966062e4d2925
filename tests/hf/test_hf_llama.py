"""DeepSeek LLM / DeepSeekMath hub checkpoints (`LlamaForCausalLM`): parity with transformers.

Tiny random checkpoints are written the way DeepSeek LLM's are on the hub: an old-style llama
config.json (model_type llama, rope_scaling null, pretraining_tp, torch_dtype) beside sharded
safetensors with q/k/v/o_proj and gate/up/down_proj names, q and k in HF's half-split RoPE layout.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.convert import hf_to_orbax, orbax_to_hf
from deepseek_jax.hf import CheckpointError, load_pretrained
from deepseek_jax.testing import MODEL_FP32, assert_close

from .conftest import hub_tensors, randomize, save_sharded

VOCAB, SEQ = 128, 20
KINDS = {"mha": 4, "gqa": 2}  # key/value heads of 4 query heads


def _llama_config(kv_heads: int) -> dict:
    """config.json in the style of deepseek-ai/deepseek-llm-7b-base (values tiny)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 176,
        "max_position_embeddings": 64,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


class Checkpoints:
    def __init__(self, root):
        self.root = root
        self.cache = {}

    def get(self, kind: str):
        """(directory, transformers model) of a tiny random llama checkpoint."""
        if kind not in self.cache:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            raw = _llama_config(KINDS[kind])
            hf_cfg = LlamaConfig(
                **{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype")},
                attn_implementation="eager",
            )
            torch.manual_seed(0)
            model = LlamaForCausalLM(hf_cfg).eval()
            randomize(model, seed=1)
            directory = os.path.join(self.root, kind)
            state = {k: v for k, v in model.state_dict().items() if "inv_freq" not in k}
            save_sharded(directory, state, n_shards=2)
            with open(os.path.join(directory, "config.json"), "w") as f:
                json.dump(raw, f, indent=2)
            self.cache[kind] = (directory, model)
        return self.cache[kind]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return Checkpoints(str(tmp_path_factory.mktemp("llama_tiny")))


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)


def _torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_llama_logits_match_transformers_fp32(ckpts, ids, logits, kind, record_property):
    directory, torch_model = ckpts.get(kind)
    model = load_pretrained(directory, jnp.float32)
    cfg = model.cfg
    assert (cfg.attention_type, cfg.kv_heads, cfg.is_moe) == ("mha", KINDS[kind], False)
    assert not cfg.rope_interleave and cfg.num_nextn_predict_layers == 0
    ref = _torch_logits(torch_model, ids)
    out = logits(model, ids)
    err = float(np.abs(out - ref).max())
    record_property("max_abs_logit_err", err)
    print(f"{kind}: max |logit - transformers| = {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert 0.5 < np.abs(ref).max() < 50, "tiny model logits should be O(1)"
    assert_close(out, ref, **MODEL_FP32)


@pytest.mark.parametrize("kind", ["gqa"])
def test_llama_hf_orbax_hf_roundtrip(ckpts, ids, logits, kind, tmp_path):
    directory, torch_model = ckpts.get(kind)
    orb = hf_to_orbax(directory, tmp_path / "orbax", progress=False, chunk_bytes=4096)
    ref = _torch_logits(torch_model, ids)
    assert_close(logits(load_pretrained(orb, jnp.float32), ids), ref, **MODEL_FP32)
    out = orbax_to_hf(orb, tmp_path / "hf", progress=False)
    before, after = hub_tensors(directory), hub_tensors(out)
    assert sorted(before) == sorted(after)
    for name, t in before.items():  # bit-exact: the maps are transposes and reshapes
        np.testing.assert_array_equal(after[name].numpy(), t.numpy(), err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"
    from transformers import LlamaForCausalLM

    again = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_close(_torch_logits(again, ids), ref, **MODEL_FP32)


def test_greedy_decode_matches_transformers_generate(ckpts, ids):
    import torch

    directory, torch_model = ckpts.get("gqa")
    model = load_pretrained(directory, jnp.float32)
    prompt, new = ids[:, :8], 10
    with torch.no_grad():
        want = torch_model.generate(
            torch.as_tensor(prompt, dtype=torch.long),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        ).numpy()[:, prompt.shape[1] :]
    graphdef, state = nnx.split(model)

    @nnx.jit
    def step(model, tokens, caches, positions):
        return model.decode(tokens, caches, positions)

    B, P = prompt.shape
    caches = model.init_cache(B, P + new)
    positions = np.broadcast_to(np.arange(P, dtype=np.int32), (B, P))
    out, caches = step(model, jnp.asarray(prompt), caches, jnp.asarray(positions))
    got = []
    for t in range(new):
        token = jnp.argmax(out[:, -1], axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
        got.append(np.asarray(token[:, 0]))
        pos = jnp.full((B, 1), P + t, jnp.int32)
        out, caches = step(model, token, caches, pos)
    np.testing.assert_array_equal(np.stack(got, axis=1), want)


def test_llama_config_json_is_mha_dense(ckpts):
    directory, _ = ckpts.get("gqa")
    cfg = ModelConfig.from_file(os.path.join(directory, "config.json"))
    assert cfg.attention_type == "mha" and cfg.n_routed_experts is None
    assert (cfg.num_dense_layers, cfg.num_moe_layers) == (3, 0)
    assert (cfg.kv_heads, cfg.attn_head_dim) == (2, 16)
    assert cfg.to_hf_dict()["architectures"] == ["LlamaForCausalLM"]


def test_llama_checkpoint_errors_name_the_tensor(ckpts, tmp_path):
    import shutil

    directory, _ = ckpts.get("mha")
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    with open(bad / "config.json") as f:
        raw = json.load(f)
    raw["num_key_value_heads"] = 2  # the files hold 4 KV heads
    with open(bad / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight.*shape \[64, 64\]"):
        load_pretrained(bad)
    raw["num_key_value_heads"], raw["rope_scaling"] = 4, {"type": "linear", "factor": 2.0}
    with open(bad / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="rope scaling type 'linear' is unsupported"):
        load_pretrained(bad)
