"""Training FLOPs per token of a DeepSeek-V2/V3 model and model FLOPs utilisation (MFU).

Convention: a matmul of an [M, K] activation with a [K, N] weight costs 2 M K N FLOPs forward and
twice that backward (input and weight gradients), so each weight used by a token costs 6 FLOPs
per training token. Element-wise work (norms, activations, softmax, RoPE, routing top-k) and the
embedding lookup (a gather) are not counted; the output head is.

Per token, with the project's dimension letters (d_qk = qk_nope + R, d_v = v_head_dim):

  weights used (P_tok):
    MLA, per layer:  D Q + Q N d_qk          (query: down, up incl. the rope part; or D N d_qk)
                     + D (C + R)             (joint KV down-projection and shared rope key)
                     + C N (qk_nope + d_v)   (K/V up-projection: the training path expands K/V)
                     + N d_v D               (output)
    dense FFN layer: 3 D F
    MoE layer:       D E (router) + (K + n_shared) 3 D F_moe   (only the K routed experts run)
    output head:     D V
    MTP depth:       2 D D (eh_proj) + one MLA + one FFN/MoE layer + D V (shared head, run again)

  attention core, per layer and token, over S keys: q.k costs 2 N S d_qk and p.v 2 N S d_v
  forward, so 6 N S (d_qk + d_v) for training. Averaged over a causal row of T queries,
  S = T / 2 (we count causal attention, *halved*):

    F_attn = 3 N T (d_qk + d_v)  per layer; the non-causal (PaLM-style) count is twice this,
                                 6 N T (d_qk + d_v) = 12 N T (d_qk + d_v) / 2

  FLOPs/token = 6 P_tok + (L + n_mtp) F_attn

Our MLA materialises the full [T, T] score matrix and masks it, so the hardware executes twice
the counted attention-core FLOPs: MFU measures useful work. For DeepSeek-V3 at T = 4096 this
gives 250 GFLOPs/token without MTP (the figure DeepSeek quotes) and 261 GFLOPs/token with it.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices), with the dense BF16 peak of the
device from `PEAK_FLOPS` (FP8 runs are still measured against the BF16 peak). A CPU has no table
entry, and one XLA:CPU device uses every core, so its peak comes from the machine (`cpu_peak`):
the larger of the vector bound read from /proc/cpuinfo (cores x fp32 lanes per FMA unit x 2 FMA
units x 2 FLOPs x clock) and the best short calibration matmul measured on the machine, divided
over the process's CPU devices. `describe_peak` says which one a run uses. MFU is capped at
100%: no run can beat the best matmul except by timing noise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig

# Dense (no sparsity) BF16 peak FLOP/s per device, matched against `device_kind` (lower case) in
# order: the first substring that occurs wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("h800", 989e12),
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
)
_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax", "cpu_peak.json")


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token, split into their terms (see the module docstring)."""

    weights_main: int  # P_tok of the main model (layers + head)
    weights_mtp: int  # P_tok of the MTP modules
    attention: int  # (L + n_mtp) * F_attn

    @property
    def total(self) -> int:
        return 6 * (self.weights_main + self.weights_mtp) + self.attention


def mla_weights(cfg: ModelConfig) -> int:
    """Weights of one MLA layer that every token multiplies."""
    D, N, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = D * N * d_qk
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * N * d_qk
    return q + D * (C + R) + C * N * (cfg.qk_nope_head_dim + d_v) + N * d_v * D


def attention_weights(cfg: ModelConfig) -> int:
    """Weights of one attention layer: MLA's, or standard MHA/GQA's D (N + 2 N_kv) H + N H D."""
    if cfg.attention_type == "mla":
        return mla_weights(cfg)
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
    return D * (N + 2 * K) * H + N * H * D


def ffn_weights(cfg: ModelConfig, moe: bool) -> int:
    """Weights of one dense FFN or the activated part of one MoE layer."""
    D = cfg.hidden_size
    if not moe:
        return 3 * D * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts
    return D * cfg.n_routed_experts + experts * 3 * D * cfg.moe_intermediate_size


def attention_core(cfg: ModelConfig, seq_len: int, causal: bool = True) -> int:
    """Training FLOPs of q.k and p.v for one token in one layer (halved when causal)."""
    d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    if cfg.attention_type == "mha":
        d_qk = d_v = cfg.attn_head_dim
    full = 6 * cfg.num_attention_heads * seq_len * (d_qk + d_v)
    return full // 2 if causal else full


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, causal: bool = True, include_mtp: bool = True
) -> FlopsPerToken:
    """Training FLOPs per token (forward + backward) of `cfg` at row length `seq_len`.

    Args:
      cfg: the architecture.
      seq_len: T, the packed row length (attention spans the row; packing masks make the true
        attention work smaller, which this count ignores).
      causal: count only the causal half of the attention core.
      include_mtp: count the MTP modules (they run in every training step).
    Returns:
      FlopsPerToken; `.total` is the number.
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    main = (
        cfg.num_hidden_layers * attention_weights(cfg)
        + cfg.num_dense_layers * ffn_weights(cfg, moe=False)
        + cfg.num_moe_layers * ffn_weights(cfg, moe=cfg.is_moe)
        + D * V
    )
    n_mtp = cfg.num_nextn_predict_layers if include_mtp else 0
    mtp = n_mtp * (2 * D * D + attention_weights(cfg) + ffn_weights(cfg, moe=cfg.is_moe) + D * V)
    attn = (cfg.num_hidden_layers + n_mtp) * attention_core(cfg, seq_len, causal)
    return FlopsPerToken(weights_main=main, weights_mtp=mtp, attention=attn)


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n")[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fma_lanes(info: dict[str, str], flags: list[str]) -> tuple[int, str]:
    """fp32 lanes one FMA unit retires per cycle -> (lanes, why when it is not the ISA width).

    The ISA's vector width (16 lanes with AVX-512, 8 with AVX2/FMA, 4 otherwise), except on AMD
    cores whose FMA units are narrower than their registers: Zen 4 (family 25 with AVX-512)
    executes a 512-bit FMA as two 256-bit halves, and Zen / Zen+ (family 23 below model 0x30)
    an AVX2 FMA as two 128-bit halves; counting the register width would double the peak.
    """
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "fma" in flags) else 4
    if info.get("vendor_id") != "AuthenticAMD":
        return lanes, ""
    family, model = int(info.get("cpu family", 0)), int(info.get("model", 0))
    if family == 25 and lanes > 8:
        return 8, " (AMD family 25: 512-bit FMA as two 256-bit halves)"
    if family == 23 and model < 0x30 and lanes > 4:
        return 4, " (AMD family 23 before Zen 2: 128-bit FMA units)"
    return lanes, ""


def cpu_vector_peak(info: dict[str, str] | None = None, cores: int | None = None):
    """Machine fp32 peak from the CPU's description -> (FLOP/s, how) or None if unknown.

    cores x fp32 lanes per FMA unit (`_fma_lanes`) x 2 FMA units x 2 FLOPs x clock (the
    `cpu MHz` cpuinfo reports; turbo can exceed it, which the calibration catches).
    """
    info = _cpuinfo() if info is None else info
    flags, mhz = info.get("flags", "").split(), info.get("cpu MHz")
    if not mhz:
        return None
    lanes, why = _fma_lanes(info, flags)
    cores = _cores() if cores is None else cores
    ghz = float(mhz) / 1e3
    value = cores * lanes * 2 * 2 * ghz * 1e9
    return value, f"cpuinfo: {cores} cores x {lanes} fp32 lanes{why} x 2 FMA x 2 x {ghz:.2f} GHz"


def calibrate_cpu_matmul(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted fp32 [n, n] @ [n, n] matmuls on one CPU device.

    The device is this process's own: in a multi-process run `jax.devices()[0]` may belong to
    another process, where the matmul is not run here and "takes" microseconds.
    """
    dev = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# The most a calibration matmul may exceed the vector bound at the cpuinfo clock by (turbo).
MAX_BOOST = 2.0


def cpu_peak(cache: str | None = _CACHE, calibrate: bool = True) -> tuple[float, str]:
    """The machine's fp32 peak FLOP/s on CPU and a sentence saying where it comes from.

    The larger of `cpu_vector_peak` (at the cpuinfo clock) and the best calibration matmul seen
    on this machine: the calibration runs once per process (`_calibration`, under a second) and
    `cache` (keyed by CPU model and core count) keeps the best result across processes, so a
    measurement taken while the machine was busy never lowers the peak. Where the clock boosts
    above the cpuinfo clock, the matmul is the larger bound. A calibration above
    `MAX_BOOST` x the vector bound is not a measurement (no clock boosts that far) and is
    neither used nor kept.
    """
    info = _cpuinfo()
    key = f"{info.get('model name', '?')}|{_cores()}"
    options = []
    vector = cpu_vector_peak(info)
    if vector is not None:
        options.append(vector)

    def plausible(value) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return ok and (vector is None or value <= MAX_BOOST * vector[0])

    if calibrate:
        kept = _read_json(cache) if cache is not None else {}
        measured, stored = _calibration(), kept.get(key)
        best = None
        if plausible(stored) and (not plausible(measured) or stored >= measured):
            best, where = float(stored), f"best kept in {cache}"
        elif plausible(measured):  # an implausible one (a matmul that did not run) is dropped
            best, where = measured, "measured now"
            if cache is not None:
                try:
                    _write_json(cache, {**kept, key: measured})
                    where = f"measured now, kept in {cache}"
                except OSError:
                    where = "measured now, cache not writable"
        if best is not None:
            options.append((best, f"calibration matmul ({where}): {best / 1e9:.0f} GFLOP/s"))
    if not options:
        raise ValueError("no CPU peak: /proc/cpuinfo has no clock; set train.peak_flops")
    return max(options, key=lambda o: o[0])


@functools.cache
def _calibration() -> float:
    """`calibrate_cpu_matmul()`, once per process."""
    return calibrate_cpu_matmul()


def _write_json(path: str, value: dict) -> None:
    """Writes `path` whole or not at all: processes of one run (or test workers) calibrate at
    the same time, and a reader must never see a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def describe_peak(device: jax.Device | None = None, override: float | None = None):
    """Peak FLOP/s of one device and where it comes from -> (FLOP/s, sentence for the log).

    On CPU the machine peak (`cpu_peak`) is shared by the process's CPU devices (one XLA:CPU
    device already uses every core; forced host devices split them).
    """
    if override is not None:
        return float(override), "train.peak_flops"
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        value, how = cpu_peak()
        n = jax.local_device_count("cpu")
        return value / n, f"CPU machine peak {value / 1e9:.0f} GFLOP/s / {n} device(s); {how}"
    return peak_flops(device), f"table entry for {device.device_kind!r} (dense BF16)"


def peak_flops(device: jax.Device | None = None, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override`, else the table, else the CPU machine peak.

    Raises:
      ValueError: an accelerator missing from the table and no override (names the device).
    """
    if override is not None:
        return float(override)
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return describe_peak(device)[0]
    kind = device.device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    raise ValueError(
        f"no peak FLOP/s known for device kind {device.device_kind!r}; set train.peak_flops "
        f"(known: {[k for k, _ in PEAK_FLOPS]})"
    )


def mfu(tokens_per_s: float, flops_token: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs/token / (devices x peak FLOP/s per device).

    Capped at 1.0: the peak is an upper bound (a table or a measured matmul), so only timing
    noise can exceed it, and a utilisation above 100% is never reported.
    """
    return min(1.0, tokens_per_s * flops_token / (num_devices * peak))
