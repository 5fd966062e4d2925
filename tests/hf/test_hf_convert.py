"""hf-to-orbax / orbax-to-hf: bit-exact round trips, orbax compatibility, sharding, atomicity."""

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from deepseek_jax import convert
from deepseek_jax.convert import hf_to_orbax, main, orbax_to_hf
from deepseek_jax.hf import CheckpointWarning, HubCheckpoint, load_pretrained, read_hf_config
from deepseek_jax.hf.safetensors_io import read_tensor


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        yield


def _same_files(a, b, torch_io):
    """Tensor for tensor: same names, dtypes, shapes and bytes."""
    x, y = torch_io.hub_tensors(a), torch_io.hub_tensors(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)), k


def _leaves(model):
    return {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=str(k))


def test_bf16_hub_orbax_hub_is_bit_exact(tiny_ckpts, torch_io, tmp_path):
    v3 = tiny_ckpts.get("v3")[0]
    src = tmp_path / "bf16"
    tensors = {
        k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        for k, v in torch_io.hub_tensors(v3).items()
    }
    torch_io.save_sharded(str(src), tensors, 3)
    shutil.copy(os.path.join(v3, "config.json"), src)
    # Tiny chunks force the row-block streaming paths used for big tensors (embedding, head).
    orb = hf_to_orbax(src, tmp_path / "orbax", progress=False, chunk_bytes=2048)
    zarr = json.loads(open(os.path.join(orb, "moe_layers.ffn.w_gate", ".zarray")).read())
    assert zarr["dtype"] == "bfloat16" and zarr["chunks"][:2] == [1, 1]
    head = json.loads(open(os.path.join(orb, "lm_head", ".zarray")).read())
    assert head["shape"] == [64, 128] and head["chunks"] == [64, 16]  # V split: 2 KB chunks
    bias = json.loads(open(os.path.join(orb, "moe_layers.ffn.router.bias", ".zarray")).read())
    assert bias["dtype"] == "<f4"
    out = orbax_to_hf(
        orb, tmp_path / "back", max_shard_bytes=150_000, progress=False, chunk_bytes=2048
    )
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    _same_files(src, out, torch_io)
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(
        open(os.path.join(src, "config.json"))
    )


def _as_written_before_the_router_rename(orb, dst):
    """A copy of our Orbax checkpoint under the names written until 2026-12-05 (the MoE router
    was ffn/gate/*, now ffn/router/*): array folders and _METADATA keys renamed, nothing else."""
    shutil.copytree(orb, dst)
    for name in os.listdir(dst):
        if ".ffn.router." in name:
            os.rename(
                os.path.join(dst, name), os.path.join(dst, name.replace(".router.", ".gate."))
            )
    meta_path = os.path.join(dst, "_METADATA")
    meta = json.load(open(meta_path))
    tree = {}
    for entry in meta["tree_metadata"].values():
        keys = [k["key"] for k in entry["key_metadata"]]
        keys = ["gate" if k == "router" and keys[i - 1] == "ffn" else k for i, k in enumerate(keys)]
        for k, key in zip(entry["key_metadata"], keys, strict=True):
            k["key"] = key
        tree[str(tuple(keys))] = entry
    meta["tree_metadata"] = tree
    json.dump(meta, open(meta_path, "w"))
    return str(dst)


def test_checkpoints_written_before_the_router_rename_load_and_export(
    tiny_ckpts, torch_io, tmp_path
):
    orb = hf_to_orbax(tiny_ckpts.get("v3")[0], tmp_path / "orbax", progress=False)
    old = _as_written_before_the_router_rename(orb, tmp_path / "old")
    assert os.path.isdir(os.path.join(old, "mtp.block.ffn.gate.weight"))
    _assert_same_params(load_pretrained(old), load_pretrained(orb))
    _same_files(
        orbax_to_hf(old, tmp_path / "hf_old", progress=False),
        orbax_to_hf(orb, tmp_path / "hf_new", progress=False),
        torch_io,
    )


def test_export_loads_in_transformers(tiny_ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    v3, _, ref = tiny_ckpts.get("v3")
    orb = hf_to_orbax(v3, tmp_path / "orbax", progress=False)
    out = orbax_to_hf(orb, tmp_path / "hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor(tiny_ckpts.ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_array_equal(logits, ref)


def test_orbax_restore_sharded_matches_hub_load(tiny_ckpts, tmp_path):
    import orbax.checkpoint as ocp

    v3 = tiny_ckpts.get("v3")[0]
    orb = hf_to_orbax(v3, tmp_path / "orbax", mesh={"data": 1, "fsdp": 8}, progress=False)
    zarr = json.loads(open(os.path.join(orb, "moe_layers.ffn.w_gate", ".zarray")).read())
    assert zarr["chunks"] == [1, 1, 8, 32]  # [L, E, D/fsdp, F]: one chunk per device shard
    meta = ocp.StandardCheckpointer().metadata(orb).item_metadata.tree
    assert tuple(meta["embed"].shape) == (128, 64)
    mesh = jax.make_mesh((1, 8), ("data", "fsdp"))
    sharded = load_pretrained(orb, mesh=mesh)
    emb = sharded.embed[...]
    assert emb.sharding.spec == jax.P(None, "fsdp") and len(emb.addressable_shards) == 8
    _assert_same_params(sharded, load_pretrained(v3))
    direct = load_pretrained(v3, mesh=mesh)  # hub folder straight onto the mesh
    assert direct.moe_layers.ffn.w_up[...].sharding.spec == jax.P(None, None, "fsdp", None)


def test_failed_conversions_leave_nothing(tiny_ckpts, tmp_path, monkeypatch):
    v2 = tiny_ckpts.get("v2_lite")[0]

    def boom(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(convert, "write_orbax_metadata", boom)
    with pytest.raises(KeyboardInterrupt):
        hf_to_orbax(v2, out / "orbax", progress=False)
    assert os.listdir(out) == []
    monkeypatch.undo()
    orb = hf_to_orbax(v2, out / "orbax", progress=False)
    monkeypatch.setattr(convert, "_write_hf_config", boom)
    with pytest.raises(KeyboardInterrupt):
        orbax_to_hf(orb, out / "hf", progress=False)
    assert os.listdir(out) == ["orbax"]


def test_cli_round_trip(tiny_ckpts, torch_io, tmp_path, capsys):
    v2 = tiny_ckpts.get("v2_lite")[0]
    orb, back = str(tmp_path / "o"), str(tmp_path / "h")
    assert main(["hf-to-orbax", v2, orb, "--no-progress", "--mesh", "fsdp=2"]) == 0
    assert main(["orbax-to-hf", orb, back, "--no-progress", "--max-shard-size", "100KB"]) == 0
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    _same_files(v2, back, torch_io)
    assert main(["hf-to-orbax", str(tmp_path / "nope"), orb + "2", "--no-progress"]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["hf-to-orbax", v2, orb, "--no-progress"]) == 1  # exists, no --overwrite
    assert main(["hf-to-orbax", v2, orb, "--no-progress", "--overwrite"]) == 0


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_export_of_a_plain_orbax_save(name, tiny_ckpts, torch_io, tmp_path):
    """A checkpoint saved by orbax itself (OCDBT) from the model state exports too."""
    import orbax.checkpoint as ocp

    v2 = tiny_ckpts.get(name)[0]
    model = load_pretrained(v2)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "state", nnx.to_pure_dict(nnx.state(model)))
    ckptr.wait_until_finished()
    out = orbax_to_hf(tmp_path / "state", tmp_path / "hf", config=model.cfg, progress=False)
    ours, ref = torch_io.hub_tensors(out), torch_io.hub_tensors(v2)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    # Without a stored config.json, export writes ModelConfig.to_hf_dict(), which reads back,
    cfg = read_hf_config(out)[0]
    assert cfg.replace(dtype="float32", param_dtype="float32") == model.cfg
    # and which transformers reads as the same model (e.g. its rotary width, qk_rope_head_dim).
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(v2).eval()(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_conversion(tiny_ckpts, tmp_path):
    fp8 = tiny_ckpts.get("v3_fp8")[0]
    orb16 = hf_to_orbax(fp8, tmp_path / "o16", progress=False)
    zarr = json.loads(open(os.path.join(orb16, "moe_layers.attn.wq_b", ".zarray")).read())
    assert zarr["dtype"] == "bfloat16"  # FP8 is stored dequantized, bf16 by default
    # 1 KB chunks: row blocks of 4 rows, which straddle the 16-row FP8 blocks.
    orb32 = hf_to_orbax(fp8, tmp_path / "o32", dtype="float32", progress=False, chunk_bytes=1024)
    reference = load_pretrained(fp8)  # dequantized in fp32 on load
    _assert_same_params(load_pretrained(orb32), reference)
    out = orbax_to_hf(
        orb32, tmp_path / "hf8", fp8=True, fp8_block=(16, 16), progress=False, chunk_bytes=1024
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["quantization_config"]["weight_block_size"] == [16, 16]
    hub, orig = HubCheckpoint(out), HubCheckpoint(fp8)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    assert hub[name].dtype == "F8_E4M3" and hub[name + "_scale_inv"].dtype == "F32"
    assert hub["model.layers.2.mlp.gate.weight"].dtype == "F32"  # gate, norms, head stay
    # Re-quantizing exactly dequantized blocks reproduces the original FP8 codes.
    same = [
        np.array_equal(read_tensor(hub[n]).view(np.uint8), read_tensor(orig[n]).view(np.uint8))
        for n in orig.tensors
        if orig[n].dtype == "F8_E4M3"
    ]
    assert np.mean(same) > 0.99
    requant = load_pretrained(out)
    for a, b in zip(
        jax.tree.leaves(nnx.state(requant)), jax.tree.leaves(nnx.state(reference)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    assert jnp.isfinite(requant.embed[...]).all()
