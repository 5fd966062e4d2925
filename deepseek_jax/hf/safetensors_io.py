"""Safetensors checkpoints on disk: header validation, lazy tensor reads, FP8 blocks, writing.

The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header length,
a JSON header mapping each tensor name to {dtype, shape, data_offsets} (offsets relative to the
end of the header) and the raw little-endian bytes. We parse it ourselves rather than through
`safetensors.safe_open` because (a) validating every header of a sharded checkpoint is then a
few kilobytes of reads and yields errors that name the tensor and the file, (b) we read row
ranges of a tensor (the 1.8 GB embedding of V3 is streamed in blocks) and (c) numpy has no
bfloat16/float8 of its own; `ml_dtypes` supplies them.

DeepSeek-V3/R1 store linear weights as float8_e4m3fn with a float32 `<name>_scale_inv` holding
one factor per `weight_block_size` block (128 x 128 in the released checkpoints; ceil at ragged
edges): weight = fp8 * scale_inv, broadcast per block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype code -> numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = ("F32", "BF16", "F16")  # plain weights we accept
FP8_CODE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


class CheckpointError(ValueError):
    """A checkpoint on disk is malformed or does not match the model (names tensor and file)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype code and shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses and validates the header of one .safetensors file (reads only the header).

    Raises:
      CheckpointError: truncated or corrupt file, unknown dtype, offsets that disagree with the
        shape, overlapping tensors or data past the end of the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header length {n}, file {size} "
                "bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(path, name, entry, data_start, data_size)
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in out.values() if t.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap (corrupt header)")
    return out


def _entry(path: str, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype!r} (known: {sorted(DTYPES)})"
        )
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry}")
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != need:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but shape {shape} {dtype} needs "
            f"{need} (corrupt header)"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has "
            f"{data_start + data_size} bytes"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, need)


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Reads a tensor, or rows [r0, r1) of its first axis, into a fresh array.

    Reads into a private buffer (not a memory map) so that pages of the file do not count
    towards the process's resident memory once the caller drops the array.
    """
    shape, start, nbytes = info.shape, info.start, info.nbytes
    if rows is not None:
        r0, r1 = rows
        row_bytes = nbytes // shape[0] if shape and shape[0] else 0
        start, nbytes, shape = start + r0 * row_bytes, (r1 - r0) * row_bytes, (r1 - r0,) + shape[1:]
    buf = np.empty(nbytes, np.uint8)
    with open(info.file, "rb") as f:
        f.seek(start)
        got = f.readinto(buf)
    if got != nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return buf.view(info.np_dtype).reshape(shape)


class HubCheckpoint:
    """All tensors of a checkpoint folder: `model.safetensors`, or shards listed by the index.

    Only headers are read on construction; `read` fetches tensor data on demand.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.tensors: dict[str, TensorInfo] = {}
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index):
            self._from_index(index)
            return
        single = os.path.join(self.directory, SINGLE_FILE)
        if os.path.isfile(single):
            self.tensors = read_header(single)
            return
        found = sorted(p for p in os.listdir(self.directory) if p.endswith(".safetensors"))
        if found:
            raise CheckpointError(
                f"{self.directory}: found {found} but neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _from_index(self, index: str) -> None:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e!r})") from None
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"{index}: tensor {names[0]!r} (and {len(names) - 1} more) point at shard "
                    f"{file!r}, which does not exist"
                )
            header = read_header(path)
            for name in names:
                if name not in header:
                    raise CheckpointError(
                        f"{index}: lists tensor {name!r} in {file!r}, which lacks it"
                    )
            for name, info in header.items():
                if name not in weight_map:
                    raise CheckpointError(f"{path}: tensor {name!r} is not listed in {index}")
                self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(
        self,
        name: str,
        dtype: np.dtype | None = None,
        rows: tuple[int, int] | None = None,
        block: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Reads tensor `name` (rows [r0, r1) if given), dequantizing FP8 blocks to `dtype`.

        Args:
          name: hub tensor name.
          dtype: result dtype (None keeps the stored dtype; FP8 weights need a float dtype).
          rows: optional row range of the first axis.
          block: FP8 block shape (from `quantization_config.weight_block_size`).
        """
        info = self.tensors[name]
        x = read_tensor(info, rows)
        if info.dtype == FP8_CODE:
            if block is None or dtype is None:
                raise CheckpointError(f"{info.file}: {name!r} is FP8; need block size and dtype")
            scale = read_tensor(self.tensors[name + SCALE_SUFFIX])
            return dequantize(x, scale, block, dtype, row_offset=0 if rows is None else rows[0])
        return x if dtype is None else x.astype(dtype, copy=False)


# ---- FP8 block scaling ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """DeepSeek's block-scaled FP8 weights (`quantization_config` of the V3/R1 config.json)."""

    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str) -> Fp8Format | None:
        """Parses `quantization_config`; None when absent; errors on anything but block FP8."""
        q = raw.get("quantization_config")
        if q is None:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise CheckpointError(
                f"{source}: quantization_config.quant_method={method!r} is unsupported "
                "(only DeepSeek's block-scaled 'fp8')"
            )
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise CheckpointError(f"{source}: quantization_config.fmt={fmt!r} is unsupported")
        block = q.get("weight_block_size")
        if (
            not isinstance(block, list | tuple)
            or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise CheckpointError(
                f"{source}: quantization_config.weight_block_size={block!r} must be two positive "
                "integers (per-tensor or per-channel FP8 is unsupported)"
            )
        return cls(tuple(block))

    def to_config(self) -> dict[str, Any]:
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block),
        }

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Shape of `weight_scale_inv` for a 2-D weight: one entry per block, ceil at edges."""
        return (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))


# float8_e4m3fn bit pattern -> float32 value: a 256-entry gather is ~4x faster than the cast.
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def dequantize(
    w: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int],
    dtype: np.dtype,
    row_offset: int = 0,
) -> np.ndarray:
    """fp8 [R, C] (rows row_offset.. of the full weight) * per-block scale -> [R, C] `dtype`.

    The product is formed in float32 (the operation DeepSeek's reference `weight_dequant`
    performs) and then cast.
    """
    R, C = w.shape
    b0, b1 = block
    x = _E4M3_TO_F32[w.view(np.uint8)]  # [R, C]
    lead = row_offset % b0  # rows of the first block row that lie before this slice
    Rp, Cp = -(-(lead + R) // b0) * b0, -(-C // b1) * b1
    if (lead, Rp, Cp) != (0, R, C):  # pad to whole blocks so a reshape lines them up
        padded = np.zeros((Rp, Cp), np.float32)
        padded[lead : lead + R, :C] = x
        x = padded
    first = row_offset // b0
    s = scale_inv[first : first + Rp // b0].astype(np.float32)  # [Rp/b0, Cp/b1]
    x = (x.reshape(Rp // b0, b0, Cp // b1, b1) * s[:, None, :, None]).reshape(Rp, Cp)
    return x[lead : lead + R, :C].astype(dtype, copy=False)


def quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Float weight [R, C] -> (float8_e4m3fn [R, C], float32 scale_inv [ceil R/b0, ceil C/b1]).

    scale_inv = amax(|block|) / 448 (E4M3's largest finite value), 1 for all-zero blocks.
    """
    R, C = w.shape
    b0, b1 = block
    Rb, Cb = -(-R // b0), -(-C // b1)
    padded = np.zeros((Rb * b0, Cb * b1), np.float32)
    padded[:R, :C] = w
    blocks = padded.reshape(Rb, b0, Cb, b1)
    amax = np.abs(blocks).max(axis=(1, 3))  # [Rb, Cb]
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(Rb * b0, Cb * b1)[:R, :C]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


# ---- writing ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def plan_shards(
    groups: Iterable[list[PlannedTensor]], max_shard_bytes: int
) -> list[list[PlannedTensor]]:
    """Splits groups of tensors (a weight with its scale), in order, into shards of at most
    `max_shard_bytes` (a bigger group gets a shard of its own), as `save_pretrained` does."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """Hub file names: model.safetensors for one shard, model-0000i-of-0000n.safetensors else."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """Writes one .safetensors file whose header is known up front; tensors arrive in order
    (whole, or as consecutive row blocks), so the file is produced without buffering it."""

    def __init__(self, path: str, tensors: list[PlannedTensor], metadata: dict[str, str]):
        self.path = path
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the spec allows space padding; aligns the data
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._tensors, self._next = tensors, 0
        self._current: PlannedTensor | None = None
        self._left = 0

    def write(self, name: str, data: np.ndarray) -> None:
        """Appends `data` (all of tensor `name`, or its next rows) to the file."""
        if self._left == 0:
            expected = self._tensors[self._next] if self._next < len(self._tensors) else None
            if expected is None or expected.name != name:
                want = None if expected is None else expected.name
                raise ValueError(f"{self.path}: got tensor {name!r}, expected {want!r}")
            self._current, self._next, self._left = expected, self._next + 1, expected.nbytes
        t = self._current
        if t.name != name or CODES.get(data.dtype) != t.dtype or data.shape[1:] != t.shape[1:]:
            raise ValueError(
                f"{self.path}: tensor {name!r} {data.dtype}{data.shape} does not match the planned "
                f"{t.dtype}{t.shape} (at {self._left} bytes left)"
            )
        blob = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if blob.size > self._left:
            raise ValueError(f"{self.path}: too many bytes for tensor {name!r}")
        self._f.write(blob.data)
        self._left -= blob.size

    def close(self) -> None:
        self._f.close()
        if self._left or self._next < len(self._tensors):
            missing = self._current if self._left else self._tensors[self._next]
            raise ValueError(f"{self.path}: closed before tensor {missing.name!r} was written")


def save_file(tensors: dict[str, np.ndarray], path: str) -> None:
    """Writes a whole dict of arrays as one .safetensors file (small checkpoints, tests, bench)."""
    planned = [
        PlannedTensor(k, CODES[np.dtype(v.dtype)], tuple(v.shape)) for k, v in tensors.items()
    ]
    writer = ShardWriter(path, planned, {"format": "pt"})
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()


def write_index(directory: str, weight_map: dict[str, str], total_size: int) -> None:
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
