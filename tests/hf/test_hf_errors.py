"""Broken checkpoints fail with errors naming the tensor and file, before any output exists."""

import json
import os

import numpy as np
import pytest

from deepseek_jax.convert import hf_to_orbax
from deepseek_jax.hf import CheckpointError, load_pretrained
from deepseek_jax.hf.safetensors_io import HubCheckpoint, save_file, write_index

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def ckpt(tmp_path, synthetic):
    directory = tmp_path / "hub"
    synthetic(directory)
    return directory


def test_control_the_unbroken_checkpoint_loads(ckpt):
    # Hub-style config (rope_theta + rope_scaling {"type": "yarn"}), two shards + index.
    model = load_pretrained(ckpt)
    assert model.cfg.rope_scaling.factor == 4.0 and model.cfg.num_nextn_predict_layers == 1
    first = HubCheckpoint(ckpt).read("model.layers.1.mlp.experts.3.up_proj.weight")
    np.testing.assert_array_equal(model.moe_layers.ffn.w_up[...][0, 3], first.T)


def _rewrite(directory, change):
    """Applies change(tensors: {name: (file, array)}) and rewrites shards + index."""
    hub = HubCheckpoint(directory)
    tensors = {n: (os.path.basename(i.file), hub.read(n)) for n, i in hub.tensors.items()}
    change(tensors)
    files = {}
    for name, (file, arr) in tensors.items():
        files.setdefault(file, {})[name] = arr
    for file in os.listdir(directory):
        if file.endswith(".safetensors"):
            os.remove(directory / file)
    for file, arrays in files.items():
        save_file(arrays, str(directory / file))
    write_index(str(directory), {n: f for n, (f, _) in tensors.items()}, 0)


def _fails(directory, tmp_path, *patterns):
    """hf_to_orbax and load_pretrained raise; the message matches; nothing was written."""
    dst = tmp_path / "out" / "orbax"
    for call in (
        lambda: hf_to_orbax(directory, dst, progress=False),
        lambda: load_pretrained(directory),
    ):
        with pytest.raises(CheckpointError) as err:
            call()
        for p in patterns:
            assert p in str(err.value), (p, str(err.value))
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_missing_tensor(ckpt, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(ckpt, lambda t: t.pop(name))
    _fails(ckpt, tmp_path, "missing tensor", repr(name))


def test_unexpected_tensor(ckpt, tmp_path):
    name = "model.layers.0.self_attn.rogue.weight"
    _rewrite(ckpt, lambda t: t.update({name: (SHARD2, np.zeros(3, np.float32))}))
    _fails(ckpt, tmp_path, "unexpected tensor", repr(name), SHARD2)


def test_wrong_shape(ckpt, tmp_path):
    name = "model.layers.2.self_attn.kv_b_proj.weight"

    def change(t):
        file, arr = t[name]
        t[name] = (file, arr[:-1])

    _rewrite(ckpt, change)
    _fails(ckpt, tmp_path, repr(name), "has shape", "expected")


def test_wrong_dtype(ckpt, tmp_path):
    name = "model.norm.weight"

    def change(t):
        file, arr = t[name]
        t[name] = (file, arr.astype(np.int32))

    _rewrite(ckpt, change)
    _fails(ckpt, tmp_path, repr(name), "has dtype I32")


def test_truncated_shard(ckpt, tmp_path):
    path = ckpt / SHARD2
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    _fails(ckpt, tmp_path, SHARD2, "truncated")


def test_corrupt_header(ckpt, tmp_path):
    path = ckpt / SHARD1
    data = bytearray(path.read_bytes())
    data[10:20] = b"\x00" * 10
    path.write_bytes(bytes(data))
    _fails(ckpt, tmp_path, SHARD1, "corrupt")


def test_index_points_at_missing_shard(ckpt, tmp_path):
    os.remove(ckpt / SHARD2)
    _fails(ckpt, tmp_path, repr(SHARD2), "does not exist")


def _edit_config(directory, **changes):
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_unsupported_model_type(ckpt, tmp_path):
    _edit_config(ckpt, model_type="mistral")
    _fails(ckpt, tmp_path, "model_type='mistral' is unsupported", "config.json")


def test_unsupported_quantization(ckpt, tmp_path):
    _edit_config(ckpt, quantization_config={"quant_method": "awq", "bits": 4})
    _fails(ckpt, tmp_path, "quant_method='awq' is unsupported", "config.json")


def test_fp8_weight_without_scale(ckpt, tmp_path):
    import ml_dtypes

    name = "model.layers.1.self_attn.o_proj.weight"
    _edit_config(ckpt, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})

    def change(t):
        file, arr = t[name]
        t[name] = (file, arr.astype(ml_dtypes.float8_e4m3fn))

    _rewrite(ckpt, change)
    _fails(ckpt, tmp_path, repr(name), f"'{name}_scale_inv' is missing")


def test_fp8_scale_with_wrong_shape(ckpt, tmp_path):
    import ml_dtypes

    name = "model.layers.1.self_attn.q_b_proj.weight"  # [96, 32]: blocks of 16 -> [6, 2]
    _edit_config(ckpt, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]})

    def change(t):
        file, arr = t[name]
        t[name] = (file, arr.astype(ml_dtypes.float8_e4m3fn))
        t[name + "_scale_inv"] = (file, np.ones((6, 1), np.float32))

    _rewrite(ckpt, change)
    _fails(ckpt, tmp_path, f"'{name}_scale_inv'", "expected F32[6, 2]")


def test_fp8_without_quantization_config(ckpt, tmp_path):
    import ml_dtypes

    name = "model.layers.0.mlp.up_proj.weight"

    def change(t):
        file, arr = t[name]
        t[name] = (file, arr.astype(ml_dtypes.float8_e4m3fn))

    _rewrite(ckpt, change)
    _fails(ckpt, tmp_path, repr(name), "no quantization_config")


def test_existing_output_is_not_touched(ckpt, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf_to_orbax(ckpt, dst, progress=False)
    assert os.listdir(dst) == ["keep.txt"]
