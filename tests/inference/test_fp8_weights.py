"""Serving a hub FP8 checkpoint with its weights kept in FP8 (deepseek_jax/fp8_weights.py).

The tiny checkpoint is written here with numpy (V3/R1 layout: float8_e4m3fn [out, in] weights and
float32 `weight_scale_inv` per 128x128 block, dims chosen so that matrices span several blocks,
some ragged). References: numpy formulas for the FP8 products, and the training FP8 recipe
(`cfg.fp8`, which quantizes dense weights on the fly) run over the dequantized checkpoint: its
128x128 re-quantization of a dequantized block gives back the stored E4M3 values, so the two
models must agree to fp32 rounding.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import fp8_weights, load_pretrained
from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8_weights import Fp8Param, Fp8Weight
from deepseek_jax.hf import CheckpointError
from deepseek_jax.hf.fp8_params import serving_block
from deepseek_jax.hf.mapping import param_maps
from deepseek_jax.hf.safetensors_io import Fp8Format, save_file
from deepseek_jax.layers import linear
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.moe import grouped_matmul
from deepseek_jax.testing import MODEL_FP32, assert_close

E4M3 = ml_dtypes.float8_e4m3fn
BLOCK = 128
CONFIG = dict(
    model_type="deepseek_v3",
    vocab_size=256,
    hidden_size=256,
    intermediate_size=384,
    moe_intermediate_size=128,
    num_hidden_layers=2,
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
    first_k_dense_replace=0,  # one MoE stack: one scan body to compile
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=0,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


# ---- independent numpy FP8 formulas -----------------------------------------------------------
def np_quantize_blocks(w: np.ndarray, b: int):
    """[R, C] -> (E4M3 [R, C], scale [ceil R/b, ceil C/b]) with scale = block amax / 448."""
    R, C = w.shape
    Rb, Cb = -(-R // b), -(-C // b)
    pad = np.zeros((Rb * b, Cb * b), np.float32)
    pad[:R, :C] = w
    amax = np.abs(pad.reshape(Rb, b, Cb, b)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(448), 1).astype(np.float32)
    full = np.repeat(np.repeat(scale, b, 0), b, 1)[:R, :C]
    return np.clip(w / full, -448, 448).astype(E4M3), scale


def np_dequantize_blocks(q: np.ndarray, scale: np.ndarray, b: int) -> np.ndarray:
    full = np.repeat(np.repeat(scale, b, -2), b, -1)[..., : q.shape[-2], : q.shape[-1]]
    return q.astype(np.float64) * full


def np_activation_qdq(x: np.ndarray, b: int) -> np.ndarray:
    """x [M, K] through E4M3 in 1 x b tiles; scale = amax * fl(1/448) (the documented formula)."""
    M, K = x.shape
    Kb = -(-K // b)
    pad = np.zeros((M, Kb * b), np.float32)
    pad[:, :K] = x
    tiles = pad.reshape(M, Kb, b)
    s = np.abs(tiles).max(-1, keepdims=True) * np.float32(1 / 448)
    s = np.where(s > 0, s, 1).astype(np.float32)
    q = np.clip(tiles / s, -448, 448).astype(E4M3)
    return (q.astype(np.float64) * s).reshape(M, Kb * b)[:, :K]


# ---- the tiny hub checkpoint ------------------------------------------------------------------
def hub_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random dense hub tensors with O(1) logits: matrices N(0, 1/fan_in), norms 1 + N(0, .2)."""
    rng = np.random.default_rng(seed)
    out = {}
    for pm in param_maps(cfg):
        for _, name in pm.pieces():
            shape = pm.hub_shape
            if pm.fp32:  # the routing selection bias
                w = 0.3 * rng.standard_normal(shape)
            elif len(shape) == 1:
                w = 1 + 0.2 * rng.standard_normal(shape)
            else:
                std = 1.0 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5
                w = std * rng.standard_normal(shape)
            out[name] = w.astype(np.float32)
    return out


def write_checkpoint(directory, tensors: dict[str, np.ndarray], fp8: bool) -> dict:
    """Writes config.json + model.safetensors; with fp8 the decoder linears are block FP8.

    Returns the stored FP8 tensors {name: (q, scale_inv)}.
    """
    os.makedirs(directory, exist_ok=True)
    raw = dict(CONFIG)
    stored, fp8_parts = {}, {}
    quantizable = {n for pm in param_maps(ModelConfig.from_dict(raw)) if pm.quantizable
                   for _, n in pm.pieces()}  # fmt: skip
    for name, w in tensors.items():
        if fp8 and name in quantizable:
            q, s = np_quantize_blocks(w, BLOCK)
            stored[name], stored[name + "_scale_inv"] = q, s
            fp8_parts[name] = (q, s)
        else:
            stored[name] = w
    if fp8:
        raw["quantization_config"] = Fp8Format((BLOCK, BLOCK)).to_config()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    save_file(stored, os.path.join(directory, "model.safetensors"))
    return fp8_parts


# The served FP8 model and its recipe twin agree to FP32 rounding with optimised code generation
# (the suite otherwise compiles at LLVM level 0; see conftest.optimized_codegen).
pytestmark = pytest.mark.usefixtures("optimized_codegen")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(fp8 folder, the same weights dequantized in an FP32 folder, stored FP8 tensors)."""
    root = tmp_path_factory.mktemp("fp8_serving")
    cfg = ModelConfig.from_dict(dict(CONFIG))
    dense = hub_tensors(cfg)
    parts = write_checkpoint(root / "fp8", dense, fp8=True)
    deq = dict(dense)
    for name, (q, s) in parts.items():
        deq[name] = np_dequantize_blocks(q, s, BLOCK).astype(np.float32)
    write_checkpoint(root / "deq", deq, fp8=False)
    return str(root / "fp8"), str(root / "deq"), parts


@pytest.fixture(scope="module")
def served(ckpt):
    return load_pretrained(ckpt[0], jnp.float32, weights="fp8")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def forward(model, ids):
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, prompt, steps: int):
    model = nnx.merge(graphdef, state)
    B, T = prompt.shape
    padded = jnp.pad(prompt, ((0, 0), (0, steps + 1)))  # [B, T + steps + 1]

    def step(carry, i):  # feeds the prompt one token at a time, then its own argmax
        caches, tok = carry
        logits, caches = model.decode(
            tok[:, None], caches, jnp.full((B, 1), i, jnp.int32)
        )  # [B, 1, V]
        greedy = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        nxt = jnp.where(i + 1 < T, padded[:, i + 1], greedy)
        return (caches, nxt), (logits[:, -1], nxt)

    caches = model.init_cache(B, T + steps)
    _, (logits, fed) = jax.lax.scan(step, (caches, prompt[:, 0]), jnp.arange(T + steps))
    return fed.T[:, T - 1 : T - 1 + steps], logits.transpose(1, 0, 2)


def greedy_decode(model, prompt, steps: int):
    """The prompt token by token through the latent cache (`model.decode`), then `steps` greedy
    tokens. Returns (new tokens [B, steps], logits of every step [B, T + steps, V])."""
    tokens, logits = _greedy(*nnx.split(model), jnp.asarray(prompt), steps)
    return np.asarray(tokens), np.asarray(logits)


# ---- the ops ------------------------------------------------------------------------------------
def test_linear_with_fp8_weight_matches_numpy():
    """MLA's output projection shape: w [N, v, D] contracting two axes, 32-blocks, ragged edges."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 40, 72)).astype(np.float32)  # K = 120, N = 72
    x = rng.standard_normal((2, 5, 3, 40)).astype(np.float32)
    fw = fp8_weights.quantize(jnp.asarray(w), in_dims=2, block=32)
    assert fw.data.dtype == jnp.float8_e4m3fn and fw.scale.shape == (4, 3)
    cfg = ModelConfig.from_dict(dict(CONFIG)).replace(dtype="float32")
    y = linear(jnp.asarray(x), fw, cfg, in_dims=2)
    w_deq = np_dequantize_blocks(np.asarray(fw.data).reshape(120, 72), np.asarray(fw.scale), 32)
    assert_close(w_deq, np.asarray(fw.astype(jnp.float32)).reshape(120, 72))
    np_q, np_s = np_quantize_blocks(w.reshape(120, 72), 32)  # the stored blocks, independently
    np.testing.assert_allclose(np.asarray(fw.scale), np_s, rtol=2e-7)
    y_ref = np_activation_qdq(x.reshape(10, 120), 32) @ w_deq
    assert y.shape == (2, 5, 72)
    assert_close(y.reshape(10, 72), y_ref)


def test_grouped_matmul_with_fp8_weight_matches_numpy():
    rng = np.random.default_rng(2)
    E, K, N, b = 3, 72, 40, 32
    w = rng.standard_normal((E, K, N)).astype(np.float32)
    fw = fp8_weights.quantize(jnp.asarray(w), stack_dims=1, block=b)
    assert fw.scale.shape == (E, 3, 2)
    sizes = np.array([3, 0, 6], np.int32)  # an empty expert; the last row belongs to none
    x = rng.standard_normal((10, K)).astype(np.float32)
    y = grouped_matmul(jnp.asarray(x), fw, jnp.asarray(sizes))
    xq = np_activation_qdq(x, b)
    owner = np.repeat(np.arange(E), sizes)
    ref = np.zeros((10, N))
    for m, e in enumerate(owner):
        ref[m] = xq[m] @ np_dequantize_blocks(np.asarray(fw.data[e]), np.asarray(fw.scale[e]), b)
    assert_close(y, ref)


# ---- loading -------------------------------------------------------------------------------------
def test_fp8_checkpoint_is_kept_as_stored(ckpt, served):
    fp8_dir, _, parts = ckpt
    layers = served.moe_layers
    for var in (layers.attn.wq_a, layers.attn.wkv_b, layers.attn.wo, layers.ffn.w_down):
        assert isinstance(var, Fp8Param) and isinstance(var[...], Fp8Weight)
    for var in (served.embed, served.lm_head, layers.ffn.router.weight, layers.attn_norm.weight):
        assert not isinstance(var, Fp8Param) and var[...].dtype == jnp.float32
    # Bytes as stored: our [K, N] is hub.T, the scale grid transposes with it.
    q, s = parts["model.layers.1.mlp.experts.5.down_proj.weight"]
    w = layers.ffn.w_down[...]
    np.testing.assert_array_equal(np.asarray(w.data[1, 5]).view(np.uint8), q.T.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(w.scale[1, 5]), s.T)
    q, s = parts["model.layers.0.self_attn.o_proj.weight"]  # [D, N*v] -> ours [N, v, D]
    w = layers.attn.wo[...]
    assert w.in_dims == 2 and w.data.shape == (2, 4, 32, 256)
    np.testing.assert_array_equal(
        np.asarray(w.data[0]).reshape(128, 256).view(np.uint8), q.T.view(np.uint8)
    )


def test_weight_bytes_half_of_bf16(ckpt, served):
    bf16 = load_pretrained(ckpt[0], jnp.bfloat16)  # dequantized, BF16 weights
    cfg = served.cfg
    lin = [pm for pm in param_maps(cfg) if pm.quantizable]
    n = sum(np.prod(pm.shape) for pm in lin)
    blocks = sum(
        np.prod(pm.stack_shape) * -(-pm.hub_shape[0] // BLOCK) * -(-pm.hub_shape[1] // BLOCK)
        for pm in lin
    )
    fp8_b, bf16_b = fp8_weights.weight_bytes(served), fp8_weights.weight_bytes(bf16)
    assert fp8_b["fp8"] == n + 4 * blocks  # one byte per weight + an fp32 scale per block
    assert bf16_b["fp8"] == 0
    dense_rest = sum(np.prod(pm.shape) for pm in param_maps(cfg) if not pm.quantizable)
    assert fp8_b["total"] - fp8_b["fp8"] == 4 * dense_rest  # the rest in param_dtype (fp32)
    assert fp8_b["fp8"] <= 0.51 * 2 * n  # half the BF16 bytes of the same weights


def test_quantize_on_load_of_dense_checkpoint(ckpt, served):
    """Quantizing the dequantized FP32 checkpoint gives back the stored E4M3 bytes."""
    with pytest.raises(CheckpointError, match="quantize_fp8"):
        load_pretrained(ckpt[1], jnp.float32, weights="fp8")
    requant = load_pretrained(ckpt[1], jnp.float32, weights="quantize_fp8")
    a = requant.moe_layers.ffn.w_gate[...]
    b = served.moe_layers.ffn.w_gate[...]
    np.testing.assert_array_equal(
        np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)
    )
    assert_close(a.scale, b.scale)


def test_forward_and_decode_match_fp8_recipe_twin(ckpt, served):
    """model(ids) and model.decode with stored FP8 weights equal the FP8 recipe on the
    dequantized weights (same products, re-quantized on the fly), to fp32 rounding.

    (Forward and decode of one FP8 model are not compared: the forward's `linear(c_kv, wkv_b)`
    quantizes the latent to E4M3, the absorbed decode multiplies dequantized W^UK / W^UV in full
    precision, as DeepSeek's inference code does in both modes; the two differ by FP8 rounding.
    The plain-precision decode = forward check is in tests/test_model.py.)"""
    dense = load_pretrained(ckpt[0], jnp.float32)  # dequantized
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: DeepSeekModel(dense.cfg.replace(fp8=True), rngs=nnx.Rngs(0)))
    )
    twin = nnx.merge(graphdef, nnx.state(dense))
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 12)).astype(np.int32)
    assert_close(forward(served, ids), forward(twin, ids), **MODEL_FP32)
    tokens, logits = greedy_decode(served, ids[:, :8], steps=3)
    twin_tokens, twin_logits = greedy_decode(twin, ids[:, :8], steps=3)
    assert_close(logits, twin_logits, **MODEL_FP32)
    np.testing.assert_array_equal(tokens, twin_tokens)


def test_requested_fp8_that_cannot_be_honoured_is_an_error(ckpt, served):
    with pytest.raises(ValueError, match="weights='int8'"):
        load_pretrained(ckpt[0], weights="int8")
    with pytest.raises(CheckpointError, match="square power-of-two"):
        serving_block("ckpt", Fp8Format((128, 64)), "fp8")
    mesh = jax.make_mesh((1,), ("fsdp",))
    with pytest.raises(ValueError, match="mesh"):
        load_pretrained(ckpt[0], weights="fp8", mesh=mesh)
    ids = jnp.zeros((1, 4), jnp.int32)
    capacity = nnx.clone(served)  # the same weights with ModelConfig.moe_impl='capacity'
    for _, node in nnx.iter_graph(capacity):
        if isinstance(node, nnx.Module) and hasattr(node, "cfg"):
            node.cfg = node.cfg.replace(moe_impl="capacity")
    with pytest.raises(ValueError, match="moe_impl='dropless'"):
        capacity(ids)
