"""Our safetensors reader/writer against the reference `safetensors` library; FP8 blocks."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_jax.hf import safetensors_io as st


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(5, 7, generator=g),
        "b.bf16": torch.randn(4, 3, 2, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(9, generator=g).to(torch.float16),
        "d.fp8": torch.randn(6, 8, generator=g).to(torch.float8_e4m3fn),
        "e.i64": torch.arange(12).reshape(3, 4),
        "f.empty": torch.zeros(0, 3),
    }


def _bits(x):
    return np.asarray(x).view(np.uint8) if x.size else np.asarray(x)


def test_reader_matches_safetensors_library(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    header = st.read_header(path)
    assert set(header) == set(tensors)
    for name, t in tensors.items():
        ours = st.read_tensor(header[name])
        ref = t.view(torch.uint8).numpy() if t.numel() else t.numpy()
        assert ours.shape == tuple(t.shape)
        np.testing.assert_array_equal(_bits(ours).reshape(-1), ref.reshape(-1))
    rows = st.read_tensor(header["b.bf16"], rows=(1, 3))
    np.testing.assert_array_equal(rows.astype(np.float32), tensors["b.bf16"][1:3].float().numpy())


def test_writer_is_readable_by_safetensors_library(tmp_path):
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16),
        "b": np.linspace(-1, 1, 5).astype(np.float32),
        "q": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.float8_e4m3fn),
    }
    path = str(tmp_path / "y.safetensors")
    st.save_file(arrays, path)
    loaded = load_file(path)
    assert loaded["w"].dtype == torch.bfloat16 and loaded["q"].dtype == torch.float8_e4m3fn
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k].float().numpy(), v.astype(np.float32))


def test_writer_streams_row_blocks_and_checks_order(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    planned = [st.PlannedTensor("x", "F32", (5, 4)), st.PlannedTensor("y", "F32", (2,))]
    w = st.ShardWriter(str(tmp_path / "z.safetensors"), planned, {"format": "pt"})
    w.write("x", x[:2])
    w.write("x", x[2:])
    with pytest.raises(ValueError, match="expected 'y'"):
        w.write("z", np.zeros(2, np.float32))
    w.write("y", np.ones(2, np.float32))
    w.close()
    np.testing.assert_array_equal(load_file(str(tmp_path / "z.safetensors"))["x"].numpy(), x)


def test_plan_shards_keeps_groups_together():
    t = [st.PlannedTensor(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 bytes each
    shards = st.plan_shards([[t[0]], [t[1], t[2]], [t[3]], [t[4]]], max_shard_bytes=100)
    assert [[x.name for x in s] for s in shards] == [["t0"], ["t1", "t2"], ["t3", "t4"]]
    assert st.shard_names(3)[1] == "model-00002-of-00003.safetensors"
    assert st.shard_names(1) == ["model.safetensors"]


def test_truncated_and_corrupt_files_are_named(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"big": torch.zeros(100, 10), "small": torch.ones(3)}, path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(
        st.CheckpointError, match=r"t\.safetensors: truncated: tensor '(big|small)'"
    ):
        st.read_header(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 20) + b"{not json at all!!!}")
    with pytest.raises(st.CheckpointError, match="corrupt safetensors header"):
        st.read_header(path)
    with open(path, "wb") as f:
        f.write(b"\x01\x02")
    with pytest.raises(st.CheckpointError, match="truncated safetensors file"):
        st.read_header(path)
    bad = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    raw = json.dumps(bad).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(st.CheckpointError, match="tensor 'x' spans 12 bytes"):
        st.read_header(path)


def test_index_errors_name_the_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "gone.safetensors"}}
    (tmp_path / st.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(st.CheckpointError, match=r"'b'.*'gone\.safetensors', which does not exist"):
        st.HubCheckpoint(tmp_path)
    index["weight_map"] = {
        "a": "model-00001-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors",
    }
    (tmp_path / st.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(st.CheckpointError, match="lists tensor 'c'"):
        st.HubCheckpoint(tmp_path)
    os.remove(tmp_path / st.INDEX_FILE)
    with pytest.raises(st.CheckpointError, match="neither model.safetensors nor"):
        st.HubCheckpoint(tmp_path)


def test_block_dequantize_matches_a_loop():
    rng = np.random.default_rng(0)
    R, C, b = 300, 200, (128, 128)  # ragged edges in both directions
    q = rng.standard_normal((R, C)).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.5, 2, (3, 2)).astype(np.float32)
    want = np.empty((R, C), np.float32)
    for i in range(R):
        for j in range(C):
            want[i, j] = np.float32(q[i, j]) * s[i // 128, j // 128]
    np.testing.assert_array_equal(st.dequantize(q, s, b, np.float32), want)
    rows = st.dequantize(q[130:260], s, b, np.float32, row_offset=130)
    np.testing.assert_array_equal(rows, want[130:260])


def test_quantize_round_trip_error_is_bounded():
    w = np.random.default_rng(1).standard_normal((200, 130)).astype(np.float32)
    q, s = st.quantize(w, (128, 128))
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (2, 2)
    back = st.dequantize(q, s, (128, 128), np.float32)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 of the block's scale-normalised value.
    amax = np.abs(w).max()
    assert np.abs(back - w).max() <= amax / 16
    assert np.abs(back).max() == pytest.approx(amax, rel=1e-6)


def test_fp8_format_parsing():
    cfg = {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
        }
    }
    assert st.Fp8Format.from_config(cfg, "c").block == (128, 128)
    assert st.Fp8Format.from_config({}, "c") is None
    assert st.Fp8Format((128, 128)).scale_shape((7168, 18432 + 1)) == (56, 145)
    with pytest.raises(st.CheckpointError, match="quant_method='gptq' is unsupported"):
        st.Fp8Format.from_config({"quantization_config": {"quant_method": "gptq"}}, "c")
    with pytest.raises(st.CheckpointError, match="weight_block_size"):
        st.Fp8Format.from_config({"quantization_config": {"quant_method": "fp8"}}, "c")
