"""Checkpoint conversion: hub safetensors <-> Orbax, streamed tensor by tensor.

    python -m deepseek_jax.convert hf-to-orbax HF_DIR ORBAX_DIR [--dtype auto] [--mesh fsdp=8]
    python -m deepseek_jax.convert orbax-to-hf ORBAX_DIR HF_DIR [--fp8] [--max-shard-size 5GB]

Orbax layout written by hf-to-orbax (restorable with plain orbax, e.g.
`ocp.StandardCheckpointer().restore(dir, abstract_tree)`, and by `load_pretrained`):
  * a PyTree checkpoint of the model's NNX state as a nested dict (`nnx.State.to_pure_dict()`
    keys: embed, dense_layers/..., moe_layers/ffn/w_gate, mtp/..., norm, lm_head);
  * one zarr (v2) array per parameter in `<dir>/<keys joined by '.'>/`, zstd-compressed,
    chunked 1 along the stacked layer/expert axes and, with --mesh, along the shard boundaries
    of the target sharding, so each device of a sharded restore reads only its own chunks;
  * orbax's `_METADATA` (tree structure, use_ocdbt=false) and `_CHECKPOINT_METADATA`;
  * `deepseek_jax.json`: our ModelConfig, the source config.json, mesh and rules.

Why not `ocp.StandardCheckpointer().save`: it needs every array in memory, and one stacked
parameter of V3 (the routed w_gate, [58, 256, 7168, 2048]) is 436 GB in bf16. Instead every hub
tensor is read, transformed and written into its slot of the stacked zarr array with tensorstore,
a bounded number of writes in flight, so peak host memory is a few tensors. Output is built in a
temporary folder beside the target and renamed into place at the end; a failed or interrupted
run leaves nothing at the target.

Export writes the hub layout (config.json, model-0000i-of-0000n.safetensors, index) in the
stored dtypes, so hub BF16 -> Orbax -> hub is bit-exact. FP8 sources are stored dequantized
(bfloat16 by default); export writes them dequantized unless `--fp8` re-quantizes the decoder
linear weights to 128x128-block float8_e4m3fn + weight_scale_inv. That is not guaranteed to
reproduce the original FP8 file: bf16 storage rounds the dequantized products (convert with
--dtype float32 to keep them exact; re-quantizing those with the original block size gave back
the original FP8 codes in our tests).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf import safetensors_io as st
from deepseek_jax.hf.load import check_mtp_copies, open_hf
from deepseek_jax.hf.mapping import (
    DEFAULT_PARAM_RULES,
    ParamMap,
    hub_order,
    mtp_copies,
    param_maps,
    parse_rules,
    partition_spec,
)
from deepseek_jax.orbax_layout import (
    LAYOUT_VERSION,
    ORBAX_META_FILE,
    open_orbax_arrays,
    read_orbax_config,
    write_orbax_metadata,
)
from deepseek_jax.restore import abstract_state, logical_axes
from deepseek_jax.sharding.mesh import parse_mesh

_DTYPE_NAMES = {"bfloat16": st.DTYPES["BF16"], "float32": st.DTYPES["F32"]}
CHUNK_BYTES = 128 * 2**20  # cap on one zarr chunk (and one streamed read)
IN_FLIGHT_BYTES = 128 * 2**20  # tensorstore writes not yet committed


# ---- output folder -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(dst: str, overwrite: bool = False):
    """Yields a temporary folder beside `dst` that replaces `dst` only if the block succeeds."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(dst)}.tmp-"
    _remove_stale_temps(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temps(parent: str, prefix: str) -> None:
    """Deletes temporary folders (`<prefix><pid>-*`) that a killed conversion left behind.

    A folder whose pid is still running on this host belongs to a live conversion and stays.
    """
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        print(f"removing {os.path.join(parent, name)}, left by an interrupted run", file=sys.stderr)
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _InFlight:
    """Bounds the bytes of tensorstore writes whose source buffers are still referenced."""

    def __init__(self, limit: int):
        self.limit, self.pending, self.bytes = limit, [], 0

    def add(self, future, nbytes: int) -> None:
        self.pending.append((future, nbytes))
        self.bytes += nbytes
        while self.bytes > self.limit:
            f, n = self.pending.pop(0)
            f.result()
            self.bytes -= n

    def drain(self) -> None:
        for f, _ in self.pending:
            f.result()
        self.pending, self.bytes = [], 0


def _prefetched(tasks, fn, workers: int, budget: int):
    """Yields fn(task) for (nbytes, task) in order, running up to `budget` bytes of tasks ahead
    on `workers` threads (numpy releases the GIL while reading, casting and transposing)."""
    if workers <= 1:
        for _, task in tasks:
            yield fn(task)
        return
    with ThreadPoolExecutor(workers) as pool:
        queue: collections.deque = collections.deque()
        ahead = 0
        for nbytes, task in tasks:
            queue.append((nbytes, pool.submit(fn, task)))
            ahead += nbytes
            while queue and (ahead > budget or len(queue) > 2 * workers):
                n, future = queue.popleft()
                ahead -= n
                yield future.result()
        while queue:
            yield queue.popleft()[1].result()


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)


def _zarr_dtype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == st.DTYPES["BF16"] else dtype.str


def _blocks(n: int, size: int):
    for r0 in range(0, n, size):
        yield r0, min(n, r0 + size)


def _region(index: tuple[int, ...], axis: int | None, rows: tuple[int, int] | None) -> tuple:
    if rows is None:
        return index
    return index + (slice(None),) * axis + (slice(*rows),)


# ---- hf -> orbax ---------------------------------------------------------------------------------
def _chunks(pm: ParamMap, dtype: np.dtype, shard: tuple[int, ...], chunk_bytes: int):
    """Chunk shape: 1 per stacked entry, the shard shape per piece axis, split along the row
    axis (or the first axis) into equal parts of at most `chunk_bytes`."""
    piece = list(shard)
    axis = pm.row_axis if pm.row_axis is not None else 0
    if piece:
        row_bytes = math.prod(piece) // max(piece[axis], 1) * dtype.itemsize
        # n equal parts; n <= rows so the search for a divisor ends (at n = rows, 1 per chunk).
        n = min(max(1, math.ceil(piece[axis] * row_bytes / chunk_bytes)), max(piece[axis], 1))
        while piece[axis] % n:
            n += 1
        piece[axis] //= n
    return [1] * len(pm.stack_shape) + piece


def _orbax_plan(source, dtype, mesh, rules, chunk_bytes):
    """(ParamMap, stored dtype, zarr chunk shape) of every parameter."""
    from flax import nnx

    _, state = abstract_state(source.cfg)
    axes = {tuple(map(str, p)): logical_axes(v) for p, v in nnx.to_flat_state(state)}
    plan = []
    for pm in source.maps:
        out = np.dtype(np.float32) if pm.fp32 else _DTYPE_NAMES.get(dtype, None)
        out = source.stored_dtype(pm) if out is None else out
        shard = list(pm.piece_shape)
        if mesh:
            spec = partition_spec(axes[pm.path], pm.shape, mesh, rules, pm.name)
            for i, part in enumerate(tuple(spec)[len(pm.stack_shape) :]):
                names = (part,) if isinstance(part, str) else tuple(part or ())
                shard[i] = -(-shard[i] // math.prod(mesh.get(n, 1) for n in names))
        plan.append((pm, out, _chunks(pm, out, tuple(shard), chunk_bytes)))
    return plan


def _read_tasks(source, plan):
    """(bytes in memory, (name, map, dtype, stack index, rows, source bytes done, file pos)) for
    every block read: hub tensors along a row axis go in blocks of one chunk's rows."""
    for pm, out, chunks in plan:
        axis = pm.row_axis
        for index, name in pm.pieces():
            info = source.ckpt[name]
            scale = source.ckpt.tensors.get(name + st.SCALE_SUFFIX)
            n = info.shape[0] if info.shape else 0
            rows = chunks[len(pm.stack_shape) + axis] if axis is not None else n
            blocks = list(_blocks(n, rows)) if rows < n else [None]
            per_row = math.prod(info.shape[1:]) * out.itemsize
            per_row *= 3 if info.dtype == st.FP8_CODE else 1  # + float32 temporaries
            for i, r in enumerate(blocks):
                last = i == len(blocks) - 1
                done = info.nbytes + (scale.nbytes if scale else 0) if last else 0
                pos = (info.file, info.start, i)
                yield per_row * (r[1] - r[0] if r else n), (name, pm, out, index, r, done, pos)


def hf_to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    mesh: Mapping[str, int] | None = None,
    rules: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
) -> str:
    """Converts a hub checkpoint folder to our Orbax layout (see the module docstring).

    Args:
      src: hub folder (config.json + safetensors, BF16/FP32 or FP8 with weight_scale_inv).
      dst: output folder (must not exist unless `overwrite`).
      dtype: "bfloat16" | "float32" to cast every weight; None keeps each tensor's stored dtype
        (FP8 -> bfloat16). The routing selection bias is always float32.
      mesh: mesh axis sizes, e.g. {"data": 1, "fsdp": 8}: chunks follow the shards of `rules`.
      rules: logical axis -> mesh axes (default DEFAULT_PARAM_RULES).
      overwrite: replace an existing `dst`.
      progress: show a tqdm bar.
      chunk_bytes: largest zarr chunk.
      workers: threads reading and transforming tensors (default min(8, CPUs)).
    Returns:
      The absolute output path.
    """
    import tensorstore as ts

    source = open_hf(src)  # validates every header before anything is written
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}: allowed {sorted(_DTYPE_NAMES)} or None")
    rules = dict(DEFAULT_PARAM_RULES if rules is None else rules)
    plan = _orbax_plan(source, dtype, mesh, rules, chunk_bytes)
    tasks = sorted(_read_tasks(source, plan), key=lambda t: t[1][-1])  # file order

    def load(task):
        name, pm, out, index, r, _, _ = task
        return pm.path, _region(index, pm.row_axis, r), pm.to_ours(source.read(name, out, r))

    with atomic_output(os.fspath(dst), overwrite) as tmp:
        check_mtp_copies(source)
        stores = {}
        for pm, out, chunks in plan:
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": os.path.join(tmp, pm.name)},
                "metadata": {
                    "shape": list(pm.shape),
                    "chunks": chunks,
                    "dtype": _zarr_dtype(out),
                    "compressor": {"id": "zstd", "level": 1},
                },
                "create": True,
            }
            stores[pm.path] = ts.open(spec).result()
        inflight = _InFlight(IN_FLIGHT_BYTES)
        done = iter([t[1][5] for t in tasks])
        total = sum(t[1][5] for t in tasks)
        with _progress(total, "hf-to-orbax", progress) as bar:
            results = _prefetched(tasks, load, workers or _workers(), IN_FLIGHT_BYTES)
            for path, region, piece in results:
                inflight.add(stores[path][region].write(piece), piece.nbytes)
                bar.update(next(done))
            inflight.drain()
        meta = {
            "layout_version": LAYOUT_VERSION,
            "model_config": source.cfg.to_dict(),
            "hf_config": source.raw_config,
            "source": os.path.abspath(os.fspath(src)),
            "fp8_source": source.fp8 is not None,
            "mesh": dict(mesh) if mesh else None,
            "rules": {k: list(v) if isinstance(v, tuple) else v for k, v in rules.items()},
        }
        write_orbax_metadata(tmp, [(pm.path, pm.shape) for pm, _, _ in plan], meta)
    return os.path.abspath(os.fspath(dst))


# ---- orbax -> hf ---------------------------------------------------------------------------------
def orbax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    fp8: bool = False,
    fp8_block: tuple[int, int] = (128, 128),
    max_shard_bytes: int = 5 * 10**9,
    config: ModelConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
) -> str:
    """Exports an Orbax checkpoint of the model state to the hub safetensors layout.

    Args:
      src: Orbax checkpoint folder (ours, or any PyTree checkpoint of the model's NNX state).
      dst: output folder (config.json, model-0000i-of-0000n.safetensors + index, or
        model.safetensors when one shard suffices).
      dtype: "bfloat16" | "float32" to cast; None writes each parameter's stored dtype.
      fp8: re-quantize decoder linear weights to block FP8 with weight_scale_inv.
      fp8_block: FP8 block shape.
      max_shard_bytes: shard size limit.
      config: ModelConfig when `src` has no deepseek_jax.json.
      overwrite: replace an existing `dst`.
      progress: show a tqdm bar.
      chunk_bytes: largest block of rows read at once.
      workers: threads reading and transforming tensors (default min(8, CPUs)).
    Returns:
      The absolute output path.
    """
    root = os.path.abspath(os.fspath(src))
    cfg = config or read_orbax_config(root)
    hf_config = None
    if os.path.isfile(os.path.join(root, ORBAX_META_FILE)):
        with open(os.path.join(root, ORBAX_META_FILE)) as f:
            hf_config = json.load(f).get("hf_config")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}: allowed {sorted(_DTYPE_NAMES)} or None")
    maps = param_maps(cfg)
    stores = open_orbax_arrays(root, maps)  # validates before any output
    workers = workers or _workers()
    fmt = st.Fp8Format(tuple(fp8_block)) if fp8 else None
    items = hub_order(maps)
    by_path = {pm.path: pm for pm in maps}
    copies = mtp_copies(cfg)
    head = ("embed",) if cfg.tie_word_embeddings else ("lm_head",)
    for name, main in copies.items():  # after the MTP layer's own tensors
        layer = name.split(".")[2]
        at = max(i for i, it in enumerate(items) if it[0].startswith(f"model.layers.{layer}."))
        src_path = ("embed",) if main == "model.embed_tokens.weight" else head
        items.insert(at + 1, (name, by_path[src_path], ()))
    planned, jobs = [], []
    for name, pm, index in items:
        out = np.dtype(np.float32) if pm.fp32 else _DTYPE_NAMES.get(dtype, None)
        out = np.dtype(stores[pm.path].dtype.numpy_dtype) if out is None else out
        quant = fmt is not None and pm.quantizable
        group = [st.PlannedTensor(name, st.FP8_CODE if quant else st.CODES[out], pm.hub_shape)]
        if quant:
            scale = st.PlannedTensor(name + st.SCALE_SUFFIX, "F32", fmt.scale_shape(pm.hub_shape))
            group.append(scale)
        planned.extend(group)
        jobs.append((name, pm, index, out, quant, group))
    shards = st.plan_shards([job[-1] for job in jobs], max_shard_bytes)
    files = st.shard_names(len(shards))
    weight_map = {t.name: file for file, shard in zip(files, shards, strict=True) for t in shard}
    shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
    tasks = [
        (nbytes, (stores[pm.path], name, pm, index, out, fmt if quant else None, r, last))
        for name, pm, index, out, quant, _ in jobs
        for nbytes, r, last in _export_blocks(pm, out, fmt if quant else None, chunk_bytes)
    ]
    with atomic_output(os.fspath(dst), overwrite) as tmp:
        writer, current, scales = None, -1, []
        with _progress(sum(t.nbytes for t in planned), "orbax-to-hf", progress) as bar:
            for name, data, scale, last in _prefetched(
                tasks, _export_block, workers, IN_FLIGHT_BYTES
            ):
                if shard_of[name] != current:
                    if writer is not None:
                        writer.close()
                    current = shard_of[name]
                    path = os.path.join(tmp, files[current])
                    writer = st.ShardWriter(path, shards[current], {"format": "pt"})
                writer.write(name, data)
                bar.update(data.nbytes)
                if scale is not None:
                    scales.append(scale)
                    if last:
                        writer.write(name + st.SCALE_SUFFIX, np.concatenate(scales))
                        scales = []
            if writer is not None:
                writer.close()
        if len(files) > 1:
            st.write_index(tmp, weight_map, sum(t.nbytes for t in planned))
        _write_hf_config(tmp, cfg, hf_config, fmt, dtype)
    return os.path.abspath(os.fspath(dst))


def _export_blocks(pm: ParamMap, out: np.dtype, fmt, chunk_bytes: int):
    """(nbytes, hub row range or None, is last) of the blocks one hub tensor is written in."""
    rows = pm.hub_shape[0] if pm.hub_shape else 0
    row_bytes = math.prod(pm.hub_shape[1:]) * max(out.itemsize, 4)
    step = rows
    if pm.row_axis is not None and rows * row_bytes > chunk_bytes:
        step = max(1, chunk_bytes // row_bytes)
        if fmt is not None:  # a block of rows must hold whole FP8 blocks
            step = max(fmt.block[0], step // fmt.block[0] * fmt.block[0])
    if step >= rows:
        return [(rows * row_bytes, None, True)]
    blocks = list(_blocks(rows, step))
    return [((r[1] - r[0]) * row_bytes, r, r == blocks[-1]) for r in blocks]


def _export_block(task):
    """Reads one block of a hub tensor from its slot of the Orbax array -> (name, data, FP8
    scale rows or None, is last block)."""
    store, name, pm, index, out, fmt, r, last = task
    region = _region(index, pm.row_axis, r)
    try:
        hub = pm.to_hub(store[region].read().result())
    except ValueError as e:  # tensorstore: NOT_FOUND chunk {i, j} stored at ... is missing
        raise st.CheckpointError(
            f"cannot read {name!r} from Orbax array {pm.name!r} (region {region}): {e}"
        ) from None
    if fmt is None:
        return name, hub.astype(out, copy=False), None, last
    q, s = st.quantize(hub.astype(np.float32), fmt.block)
    return name, q, s, last


def _write_hf_config(root, cfg, hf_config, fmt, dtype) -> None:
    out = dict(hf_config) if hf_config is not None else cfg.to_hf_dict()
    out.pop("quantization_config", None)
    if fmt is not None:
        out["quantization_config"] = fmt.to_config()
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in out:
                out[key] = dtype
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(out, f, indent=2)


# ---- command line --------------------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _return_freed_buffers_to_os() -> None:
    """Serves allocations >= 64 KiB with mmap, so a freed tensor goes back to the OS at once.

    glibc's adaptive threshold otherwise keeps freed blocks of up to 32 MiB in per-thread arenas;
    over a conversion of thousands of tensors (read here, compressed on tensorstore's threads)
    that retention grew peak RSS by ~0.3 GB per GB converted in bench_convert.py. Process-wide,
    so only the command line sets it.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 2**10)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def _target_mesh(text: str) -> dict[str, int]:
    sizes = parse_mesh(text)
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"--mesh {text!r}: sizes must be positive (no -1 for a target mesh)")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_jax.convert", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="hub safetensors folder -> Orbax checkpoint")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *_DTYPE_NAMES],
        help="stored dtype; auto keeps each tensor's (FP8 is dequantized to bfloat16)",
    )
    a.add_argument("--mesh", default=None, help="target mesh, e.g. data=1,fsdp=8")
    a.add_argument(
        "--rules", default=None, help="logical=mesh axes, e.g. embed=fsdp,experts=expert"
    )
    b = sub.add_parser("orbax-to-hf", help="Orbax checkpoint -> hub safetensors folder")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument(
        "--dtype", default="auto", choices=["auto", *_DTYPE_NAMES], help="auto: stored dtypes"
    )
    b.add_argument("--fp8", action="store_true", help="re-quantize linear weights to block FP8")
    b.add_argument("--max-shard-size", default="5GB", type=_size)
    for s in (a, b):
        s.add_argument("--overwrite", action="store_true")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--workers", type=int, default=None, help="reader threads (default <= 8)")
    args = p.parse_args(argv)
    dtype = None if args.dtype == "auto" else args.dtype
    _return_freed_buffers_to_os()
    try:
        if args.command == "hf-to-orbax":
            out = hf_to_orbax(
                args.src,
                args.dst,
                dtype=dtype,
                mesh=_target_mesh(args.mesh) if args.mesh else None,
                rules=parse_rules(args.rules) if args.rules else None,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                workers=args.workers,
            )
        else:
            out = orbax_to_hf(
                args.src,
                args.dst,
                dtype=dtype,
                fp8=args.fp8,
                max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                workers=args.workers,
            )
    except (st.CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
