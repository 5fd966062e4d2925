"""Hub <-> ours name/layout mapping: coverage of the model tree, inverses, hub names."""

import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.hf.mapping import hub_order, mtp_copies, param_maps, split_fused_experts
from deepseek_jax.hf.safetensors_io import TensorInfo
from deepseek_jax.params import abstract_model


@pytest.mark.parametrize(
    "preset", ["v3-tiny", "deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b"]
)
def test_maps_cover_the_model_exactly(preset):
    cfg = load_preset(preset)
    state = nnx.state(abstract_model(cfg))
    ours = {tuple(map(str, p)): v.shape for p, v in nnx.to_flat_state(state)}
    maps = {pm.path: pm.shape for pm in param_maps(cfg)}
    assert maps == ours


def test_v3_671b_hub_names():
    cfg = load_preset("deepseek-v3-671b")
    names = {name for name, _, _ in hub_order(param_maps(cfg))} | set(mtp_copies(cfg))
    # 61 layers + the MTP layer 61; layers 0-2 dense; 256 experts; one shared expert.
    assert "model.layers.2.mlp.down_proj.weight" in names
    assert "model.layers.3.mlp.experts.255.down_proj.weight" in names
    assert "model.layers.61.mlp.experts.0.gate_proj.weight" in names
    assert "model.layers.61.shared_head.head.weight" in names
    assert "model.layers.60.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.62.input_layernorm.weight" not in names
    per_moe_layer = 3 * 256 + 2 + 3 + 7 + 2  # experts, gate+bias, shared, attention, norms
    expected = 2 + 1 + 3 * (7 + 2 + 3) + 58 * per_moe_layer + (4 + per_moe_layer + 2)
    assert len(names) == expected


def test_piece_transforms_are_exact_inverses():
    cfg = load_preset("v3-tiny")
    rng = np.random.default_rng(0)
    for pm in param_maps(cfg):
        hub = rng.standard_normal(pm.hub_shape).astype(np.float32)
        ours = pm.to_ours(hub)
        assert ours.shape == pm.piece_shape, pm.name
        np.testing.assert_array_equal(pm.to_hub(ours), hub)
        if pm.row_axis is not None and len(pm.hub_shape) > 0:  # row blocks map to row blocks
            block = pm.to_ours(hub[2:5])
            np.testing.assert_array_equal(block, np.take(ours, range(2, 5), axis=pm.row_axis))


def test_head_layouts():
    cfg = load_preset("v3-tiny")
    by = {pm.name: pm for pm in param_maps(cfg)}
    N, H, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    wq_b, wo = by["moe_layers.attn.wq_b"], by["moe_layers.attn.wo"]
    hub = np.arange(np.prod(wq_b.hub_shape), dtype=np.float32).reshape(wq_b.hub_shape)
    # q_b_proj row n*H + h is head n, dim h (PyTorch .view(..., N, H)).
    np.testing.assert_array_equal(wq_b.to_ours(hub)[:, 2, 5], hub[2 * H + 5])
    hub = np.arange(np.prod(wo.hub_shape), dtype=np.float32).reshape(wo.hub_shape)
    np.testing.assert_array_equal(wo.to_ours(hub)[3, 7], hub[:, 3 * v + 7])
    assert by["moe_layers.ffn.w_gate"].template.endswith("mlp.experts.{expert}.gate_proj.weight")
    assert by["mtp.block.ffn.w_up"].layers == (cfg.num_hidden_layers,)
    assert N == wq_b.piece_shape[1]


def test_fused_experts_become_hub_pieces():
    E, F, D = 4, 3, 5
    itemsize = 4
    gate_up = TensorInfo(
        "model.layers.1.mlp.experts.gate_up_proj",
        "f",
        "F32",
        (E, 2 * F, D),
        100,
        E * 2 * F * D * itemsize,
    )
    down = TensorInfo(
        "model.layers.1.mlp.experts.down_proj", "f", "F32", (E, D, F), 9000, E * D * F * itemsize
    )
    out = split_fused_experts({gate_up.name: gate_up, down.name: down})
    assert len(out) == 3 * E
    up2 = out["model.layers.1.mlp.experts.2.up_proj.weight"]
    assert up2.shape == (F, D) and up2.start == 100 + (2 * 2 * F + F) * D * itemsize
    down3 = out["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert down3.shape == (D, F) and down3.start == 9000 + 3 * D * F * itemsize
