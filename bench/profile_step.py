"""Where the time of one jitted train step goes on this machine: a `jax.profiler` trace of a few
steps, each XLA op's self time (its trace event minus the ops nested in it) grouped by what it
computes, read from the compiled HLO (op shapes and `op_name` metadata):

  * routed experts    - the block-sparse expert GEMM's loops (named scope "block_gmm");
  * attention scores  - the score / value einsums and ops on [.., T, T] arrays (mask, softmax);
  * embed, head, loss - ops outside the layers' named scopes ("dense_layer<i>", "moe_layer<i>");
  * other layer ops   - projections, norms, rope, gate, token dispatch/combine, shared expert;
  * unnamed ops       - ops without an op_name: buffer zero-fills and copies XLA inserts (with
                        --scan, the layer scan's stacked residuals; the CPU config loops over its
                        4 layers instead), cumsums of the expert layout;
  * optimizer/update  - ops outside the forward and backward (AdamW, clipping, bias update).

Forward (`jvp`) and backward (`transpose(jvp)`) are reported apart. XLA:CPU may run independent
ops at the same time on its threads, so the parts can overlap and their sum exceed the step's
wall time: compare changes end to end (bench/bench_vs_torch.py), not by this table alone.
Host malloc as in train_main.py on CPU (`train.host_malloc`; `--host-malloc system` profiles glibc's
defaults, under which the page faults of each step's fresh temporaries land in these ops).
Shape and settings: the CPU comparison's (bench/bench_vs_torch.py: v3-small without MTP, fp32,
B x T = 8 x 256, layers looped as in configs/train-v3-small.yaml; --scan scans them).

    python bench/profile_step.py                     # dropless (the CPU default)
    python bench/profile_step.py --impl capacity --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_torch import Ours, _cfg, _tokens  # noqa: E402

from deepseek_jax import host_memory  # noqa: E402
from deepseek_jax.mla import causal_query_blocks  # noqa: E402

_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(text: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """HLO instruction name -> (output shape, op_name metadata)."""
    out = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            dims = tuple(int(d) for d in m.group(3).split(",") if d)
            name = _OP_NAME.search(line)
            out[m.group(1)] = (dims, name.group(1) if name else "")
    return out


def self_times(events: list[dict]) -> collections.Counter:
    """Event name -> summed self time (us): each complete event minus its directly nested ones."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    total = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, child time]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]:
                end, name, child, dur = stack.pop()
                total[name] += dur - child
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
        for _, name, child, dur in stack:
            total[name] += dur - child
    return total


def category(shape: tuple[int, ...], op_name: str, seq: int) -> tuple[str, str]:
    if not op_name:
        # XLA's buffer fills and copies (e.g. a layer scan's stacked residuals) carry no op_name
        return "unnamed ops", "outside"
    if "transpose(jvp" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        return "optimizer/update", "outside"
    if "block_gmm" in op_name:  # the expert GEMM's loops (kernels/block_grouped_matmul.py)
        return "routed experts", phase
    if "layer" not in op_name:  # outside the layers' named scopes: embedding, head, loss
        return "embed, head, loss", phase
    blocks = causal_query_blocks(seq)  # scores [.., b - a, b] per causal query block
    block_shapes = {(b - a, b) for a, b in blocks} | {(seq, seq)}
    if (len(shape) >= 2 and tuple(shape[-2:]) in block_shapes) or re.search(r"bnts|bsnv", op_name):
        return "attention scores", phase
    return "other layer ops", phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", default="dropless", choices=["dropless", "capacity"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest ops")
    ap.add_argument("--scan", action="store_true", help="scan the layers (model.scan_layers)")
    ap.add_argument("--host-malloc", default="reuse", choices=["reuse", "system"])
    args = ap.parse_args()
    host_memory.configure(args.host_malloc)  # as train_main.py on CPU (before the backend)
    cfg = _cfg(args.impl)
    ours = Ours(args.impl, _tokens(cfg.vocab_size, args.batch, args.seq), 1e-3, args.scan)
    ours.step()
    ours.step()  # compiled and warm
    ops = hlo_ops(ours.step_fn.lower(ours.state, ours.batch).compile().as_text())
    trace_dir = tempfile.mkdtemp(prefix="profile-step-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.steps):
        ours.step()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    table = collections.defaultdict(float)
    per_op = collections.Counter()
    for name, us in self_times(events).items():
        if name in ops:  # XLA ops only (not the Python or runtime frames)
            table[category(*ops[name], args.seq)] += us / 1e3 / args.steps
            per_op[name] += us / 1e3 / args.steps
    total = sum(table.values())
    cats = [
        "routed experts",
        "attention scores",
        "embed, head, loss",
        "other layer ops",
        "unnamed ops",
        "optimizer/update",
    ]
    print(
        f"{args.impl}, B x T = {args.batch} x {args.seq}, {jax.device_count()} device(s): "
        f"{total:.0f} ms of XLA ops per step"
    )
    print("| part | forward (ms) | backward (ms) | outside (ms) | share |")
    print("|---|---|---|---|---|")
    for c in cats:
        row = [table.get((c, p), 0.0) for p in ("forward", "backward", "outside")]
        print(f"| {c} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} | {sum(row) / total:.0%} |")
    for name, ms in per_op.most_common(args.top):
        shape, op_name = ops[name]
        part, phase = category(shape, op_name, args.seq)
        print(f"{ms:7.1f} ms  {part} / {phase}  {name} {list(shape)}  {op_name[-110:]}")


if __name__ == "__main__":
    main()
