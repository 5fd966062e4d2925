"""Side by side in one process: HF transformers' DeepseekV3ForCausalLM (PyTorch) vs our jitted step.

Same shape for both: v3-small without MTP (4 layers, d 256, 16 routed experts top-4 + 1 shared,
MLA), B x T = 8 x 256 random tokens, fp32, AdamW. Rows:
  * torch                 - `model(input_ids, labels=...)`, `loss.backward()`, `torch.optim.AdamW`
                            (eager, as a new user would run it; transformers' default attention);
  * ours, dropless        - `make_train_step` (AdamW + clipping, balance loss, bias update) with
                            exact dropless routing (the block-sparse expert GEMM on CPU);
  * ours, capacity        - the same with capacity-factor 1.25 buffers (may drop tokens).
and the forward pass alone (prefill: logits of the 8 x 256 batch, no gradient) for torch and
ours. The timed steps are interleaved round by round (torch, dropless, capacity, ...) so that load
from other processes hits every row alike; each row reports the median step over all rounds and
in how many rounds its median step beat torch's of the same round ("rounds faster").
"Compile" is the first call (tracing + XLA compile for ours, the first eager step for torch).
Both frameworks run in one process under the same malloc settings: by default freed host memory
stays in the process, as train_main.py has it on CPU (`--host-malloc system` leaves glibc's
defaults, under which XLA:CPU maps and page-faults its temporaries afresh every step).

    python bench/bench_vs_torch.py                 # ~10 rounds of 3 steps each
    python bench/bench_vs_torch.py --rounds 3 --steps 2 --batch 2 --seq 64   # quick look
    python bench/bench_vs_torch.py --cpus 1        # both frameworks on one core

torch and transformers come from the `test` extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import host_memory
from deepseek_jax.config import load_preset
from deepseek_jax.losses import LossConfig
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state, make_train_step


def _tokens(vocab: int, B: int, T: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, (B, T + 1)).astype(np.int32)


def _cfg(impl: str, scan_layers: bool = False):
    """configs/train-v3-small.yaml's model settings (no remat, layers looped), without MTP."""
    return load_preset("v3-small").replace(
        num_nextn_predict_layers=0,
        moe_impl=impl,
        remat="none",
        scan_layers=scan_layers,
        dtype="float32",
    )


class Ours:
    """Our jitted train step and forward, one MoE implementation."""

    def __init__(self, impl: str, ids: np.ndarray, lr: float, scan_layers: bool = False):
        cfg = _cfg(impl, scan_layers)
        tcfg = TrainConfig(steps=1000, lr=lr, warmup_steps=0, schedule="constant")
        self.graphdef, self.state = init_train_state(cfg, tcfg, seed=0)
        self.step_fn = make_train_step(cfg, LossConfig(mtp_lambda=0.0), tcfg, self.graphdef)
        B, T = ids.shape[0], ids.shape[1] - 1
        self.batch = jax.device_put(
            {
                "input_ids": ids[:, :-1],
                "labels": ids[:, 1:],
                "loss_mask": np.ones((B, T), np.int32),
                "segment_ids": np.ones((B, T), np.int32),
                "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            }
        )

        @jax.jit
        def forward(params, biases, other, input_ids):
            model = nnx.merge(self.graphdef, params, biases, other)
            return model(input_ids).logits

        self.forward_fn = forward
        self.loss = float("nan")

    def step(self) -> None:
        self.state, metrics = self.step_fn(self.state, self.batch)
        self.loss = float(metrics["loss"])  # blocks until the step is done

    def forward(self) -> None:
        s = self.state
        jax.block_until_ready(self.forward_fn(s.params, s.biases, s.other, self.batch["input_ids"]))


TORCH = "torch (transformers, eager)"  # the baseline row


class Torch:
    """transformers' DeepseekV3ForCausalLM of the same architecture, trained eagerly."""

    def __init__(self, ids: np.ndarray, lr: float):
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        hf = _cfg("dropless").to_hf_dict()
        hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
        torch.manual_seed(0)
        self.torch = torch
        self.model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).float()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1)
        self.ids = torch.from_numpy(ids[:, :-1].astype(np.int64))
        self.labels = torch.from_numpy(ids[:, 1:].astype(np.int64))
        self.loss = float("nan")

    def step(self) -> None:
        self.model.train()
        logits = self.model(self.ids).logits  # [B, T, V]
        loss = self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.labels.reshape(-1)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.loss = float(loss.detach())

    def forward(self) -> None:
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.ids)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="steps per row per round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--host-malloc",
        default="reuse",
        choices=["reuse", "system"],
        help="train.host_malloc for this process (both frameworks)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="pin the process to its first N CPUs before either framework starts (both then "
        "size their thread pools to N); default: every CPU",
    )
    args = parser.parse_args()
    if args.cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cpus <= len(allowed):
            parser.error(f"--cpus {args.cpus}: this process may run on {len(allowed)} CPUs")
        os.sched_setaffinity(0, allowed[: args.cpus])
    host_memory.configure(args.host_malloc)
    jnp.zeros(())  # start the backend before torch spawns its threads
    import torch
    import transformers

    B, T = args.batch, args.seq
    ids = _tokens(_cfg("dropless").vocab_size, B, T)
    rows = {
        TORCH: Torch(ids, args.lr),
        "ours, dropless (exact)": Ours("dropless", ids, args.lr),
        "ours, capacity 1.25": Ours("capacity", ids, args.lr),
    }
    first = {name: _timed(r.step) for name, r in rows.items()}
    first_fwd = {name: _timed(r.forward) for name, r in rows.items()}
    steps = {name: [] for name in rows}
    fwds = {name: [] for name in rows}
    rounds = {name: [] for name in rows}  # each round's median step
    for _ in range(args.rounds):
        for name, r in rows.items():
            times = [_timed(r.step) for _ in range(args.steps)]
            steps[name] += times
            rounds[name].append(statistics.median(times))
            fwds[name] += [_timed(r.forward) for _ in range(args.steps)]
    load = os.getloadavg()[0]
    print(
        f"\n{B} x {T} tokens, fp32; jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the end; "
        f"{args.rounds} rounds x {args.steps} steps, medians; host malloc {args.host_malloc}\n"
    )
    torch_step = statistics.median(steps[TORCH])
    torch_fwd = statistics.median(fwds[TORCH])
    print(
        "| implementation | first step (s) | train step (ms) | train tokens/s | vs torch "
        "| rounds faster | prefill (ms) | prefill tokens/s | vs torch | loss after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        s, f = statistics.median(steps[name]), statistics.median(fwds[name])
        won = "-"  # rounds whose median step beat torch's median step of the same round
        if name != TORCH:
            beat = sum(o < t for o, t in zip(rounds[name], rounds[TORCH], strict=True))
            won = f"{beat}/{args.rounds}"
        print(
            f"| {name} | {first[name]:.1f} | {1e3 * s:.0f} | {B * T / s:.0f} | "
            f"{torch_step / s:.2f}x | {won} | "
            f"{1e3 * f:.0f} (first {first_fwd[name]:.1f} s) | "
            f"{B * T / f:.0f} | {torch_fwd / f:.2f}x | {r.loss:.3f} |"
        )


if __name__ == "__main__":
    main()
