"""The MTP layer (hub layer index num_hidden_layers) maps onto our MTP module.

transformers does not implement MTP, so instead of logits these tests check that every MTP
weight we load is the file's tensor in our layout, and how the shared embedding/head copies and
MTP-less checkpoints are handled.
"""

import os
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deepseek_jax.hf import CheckpointError, CheckpointWarning, load_pretrained, open_hf
from deepseek_jax.hf.load import check_mtp_copies
from deepseek_jax.hf.safetensors_io import HubCheckpoint

L = 3  # the tiny models' num_hidden_layers: MTP depth 0 is model.layers.3


def _file(directory):
    ckpt = HubCheckpoint(directory)
    return lambda name: ckpt.read(name)


def test_mtp_weights_are_the_files(tiny_ckpts):
    directory = tiny_ckpts.get("v3")[0]
    model = load_pretrained(directory)
    cfg, mtp, f = model.cfg, model.mtp, _file(directory)
    N, H, Q = cfg.num_attention_heads, cfg.qk_head_dim, cfg.q_lora_rank
    p = f"model.layers.{L}."
    np.testing.assert_array_equal(mtp.enorm.weight[...][0], f(p + "enorm.weight"))
    np.testing.assert_array_equal(mtp.hnorm.weight[...][0], f(p + "hnorm.weight"))
    np.testing.assert_array_equal(mtp.norm.weight[...][0], f(p + "shared_head.norm.weight"))
    # eh_proj: [D, 2D] (out, in) in the file; x @ W with the embedding half first for us.
    np.testing.assert_array_equal(mtp.eh_proj[...][0], f(p + "eh_proj.weight").T)
    blk = mtp.block
    np.testing.assert_array_equal(
        blk.attn.wq_b[...][0], f(p + "self_attn.q_b_proj.weight").T.reshape(Q, N, H)
    )
    np.testing.assert_array_equal(blk.attn_norm.weight[...][0], f(p + "input_layernorm.weight"))
    for e in (0, 5):
        np.testing.assert_array_equal(
            blk.ffn.w_down[...][0, e], f(p + f"mlp.experts.{e}.down_proj.weight").T
        )
    np.testing.assert_array_equal(
        blk.ffn.router.bias[...][0], f(p + "mlp.gate.e_score_correction_bias")
    )
    # The MTP block is distinct from the last main layer (the file's layer 3 != layer 2).
    assert not np.array_equal(
        blk.ffn.router.weight[...][0], model.moe_layers.ffn.router.weight[...][-1]
    )


def test_every_mtp_parameter_round_trips_through_the_mapping(tiny_ckpts):
    directory = tiny_ckpts.get("v3")[0]
    src = open_hf(directory)
    mtp_maps = [pm for pm in src.maps if pm.path[0] == "mtp"]
    assert len(mtp_maps) >= 20
    for pm in mtp_maps:
        ours = src.read_param(pm, np.float32)  # [1, *stack, *piece]
        for index, name in pm.pieces():
            np.testing.assert_array_equal(pm.to_hub(ours[index]), src.read(name, np.float32))


def _copy_with(directory, dst, change):
    shutil.copytree(directory, dst)
    path = os.path.join(dst, "model-mtp.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_differing_mtp_embedding_copy_warns(tiny_ckpts, tmp_path):
    def perturb(t):
        t[f"model.layers.{L}.embed_tokens.weight"][3, 1] += 1.0

    directory = _copy_with(tiny_ckpts.get("v3")[0], tmp_path / "ckpt", perturb)
    with pytest.warns(CheckpointWarning, match=f"model.layers.{L}.embed_tokens.weight"):
        differ = check_mtp_copies(open_hf(directory))
    assert differ == [f"model.layers.{L}.embed_tokens.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_mtp_copies(open_hf(tiny_ckpts.get("v3")[0])) == []


def test_partial_mtp_layer_is_an_error(tiny_ckpts, tmp_path):
    name = f"model.layers.{L}.eh_proj.weight"
    directory = _copy_with(tiny_ckpts.get("v3")[0], tmp_path / "ckpt", lambda t: t.pop(name))
    index = os.path.join(directory, "model.safetensors.index.json")
    text = open(index).read().replace(f'"{name}": "model-mtp.safetensors", ', "")
    text = text.replace(f', "{name}": "model-mtp.safetensors"', "")
    with open(index, "w") as f:
        f.write(text)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        open_hf(directory)


def test_checkpoint_without_mtp_loads_without_it(tiny_ckpts):
    # transformers' save_pretrained drops layer num_hidden_layers; its V3 config still says 1.
    directory = tiny_ckpts.get("v3_fp8")[0]
    with pytest.warns(CheckpointWarning, match="no MTP tensors"):
        src = open_hf(directory)
    assert src.cfg.num_nextn_predict_layers == 0
    assert src.raw_config["num_nextn_predict_layers"] == 1
