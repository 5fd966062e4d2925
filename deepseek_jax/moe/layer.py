"""The DeepSeekMoE layer: shared experts plus fine-grained routed experts (V2 eq. 9, V3 eq. 12).

    h'_t = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)

The routed sum is computed three ways, held equal by tests:
  * `dropless`  - tokens sorted by expert, grouped matmuls (`jax.lax.ragged_dot` or our kernel);
  * `capacity`  - GShard-style fixed [E, C, D] buffers; per expert, assignments beyond the capacity
                  C = ceil(capacity_factor * M * K / E) are dropped, lowest affinity first (V2's
                  dropping rule, Sec. 2.2.3; the device-level variant lives in the expert-parallel
                  path, where a device is the unit of capacity);
  * `reference` - every expert on every token, weighted by a dense [M, E] gate matrix.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import fp8_weights
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, param
from deepseek_jax.moe import expert_parallel
from deepseek_jax.moe.dispatch import expert_capacity, routed_capacity, routed_dropless
from deepseek_jax.moe.reference import routed_reference
from deepseek_jax.moe.router import Router, Routing
from deepseek_jax.sharding.parallel import ONE_DEVICE, ParallelConfig

Algorithm = Literal["dropless", "capacity", "reference"]


class MoEStats(NamedTuple):
    """Per-sequence routing statistics of one MoE layer (inputs to balance losses / bias update)."""

    expert_counts: jax.Array  # [B, E] tokens of each sequence routed to each expert
    score_sums: jax.Array  # [B, E] sum over tokens of per-token-normalised affinities s'
    group_counts: jax.Array  # [B, G] tokens of each sequence sent to each expert group
    dropped: jax.Array  # [] fraction of (token, expert) assignments dropped (capacity path)
    tokens: jax.Array  # [B] tokens counted per sequence (non-padding)


class MoE(nnx.Module):
    """Shared experts + router + routed experts [E, D, F] (experts stacked for grouped matmuls)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = Router(cfg, rngs=rngs)
        self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.w_up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.w_down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), cfg)
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, F * cfg.n_shared_experts, rngs=rngs)
        else:
            self.shared = None

    def __call__(
        self,
        x: jax.Array,
        token_mask: jax.Array | None = None,
        *,
        parallel: ParallelConfig = ONE_DEVICE,
        algorithm: Algorithm | None = None,
    ) -> tuple[jax.Array, MoEStats]:
        """x [B, T, D] -> (output [B, T, D], per-sequence routing stats).

        Args:
          x: [B, T, D] normalised hidden states.
          token_mask: [B, T] bool, False on padding; None = every token is real.
          parallel: with an exchange other than 'none', the routed experts run expert-parallel
            under shard_map on parallel.mesh (moe/expert_parallel.py); else on one device (and
            GSPMD partitions them on a mesh).
          algorithm: the single-device plan, default cfg.moe_impl; 'reference' (every expert on
            every token) is the test oracle. Only with parallel.exchange == 'none'.
        """
        cfg = self.cfg
        B, T, D = x.shape
        stored_fp8 = isinstance(self.w_gate[...], fp8_weights.Fp8Weight)
        if parallel.expert_parallel:
            if algorithm is not None:
                raise ValueError(
                    f"MoE algorithm={algorithm!r} runs on one device; under expert parallelism "
                    f"the exchange ParallelConfig.exchange={parallel.exchange!r} decides"
                )
            if stored_fp8:
                raise ValueError(
                    "MoE: FP8 serving weights run only with moe_impl='dropless' and "
                    f"ParallelConfig.exchange='none', got exchange={parallel.exchange!r}"
                )
            # The master weights: the FSDP gather sends compute-dtype bytes, the weight
            # gradients come back FP32 (V3 Sec. 3.3.3; expert_parallel._gather_as).
            ws = [w[...] for w in (self.w_gate, self.w_up, self.w_down)]
            routed, r, dropped = expert_parallel.expert_parallel_routed(
                self.router, x, *ws, cfg, parallel=parallel, token_mask=token_mask
            )
            out = routed if self.shared is None else routed + self.shared(x)
            return out.astype(x.dtype), self._stats(r, B, T, token_mask, dropped)
        impl = algorithm or cfg.moe_impl
        xf = x.reshape(B * T, D)  # [M, D]
        r = self.router(xf)
        dt = cfg.compute_dtype
        xc = xf.astype(dt)
        ws = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if stored_fp8:  # the grouped FP8 GEMM consumes the stored blocks (fp8_weights.py)
            if impl != "dropless":
                raise ValueError(f"MoE: FP8 serving weights need moe_impl='dropless', got {impl!r}")
        elif impl == "reference":
            ws = tuple(w.astype(dt) for w in ws)
        # Otherwise the dropless and capacity products take the FP32 master weights, cast (or,
        # under FP8, quantise) them per product and return FP32 weight gradients (V3 Sec. 3.3.3).
        dropped = jnp.zeros((), jnp.float32)
        if impl == "dropless":
            routed = routed_dropless(xc, r, *ws, fp8=cfg.fp8)
        elif impl == "capacity":
            tm = None if token_mask is None else token_mask.reshape(B * T)
            routed, keep = routed_capacity(
                xc, r, *ws, expert_capacity(B * T, cfg), fp8=cfg.fp8, token_mask=tm
            )
            real = (
                jnp.ones((B * T, 1), jnp.float32) if tm is None else tm.astype(jnp.float32)[:, None]
            )
            # the fraction of *real* (token, expert) assignments that found no slot
            dropped = 1.0 - keep.sum(dtype=jnp.float32) / jnp.maximum(real.sum() * keep.shape[1], 1)
        elif impl == "reference":
            if cfg.fp8:  # a test oracle in the compute dtype: never a silent BF16 fallback
                raise ValueError(
                    "MoE algorithm='reference' runs the routed experts in ModelConfig.dtype and "
                    "cannot honour ModelConfig.fp8=True; use 'dropless' or 'capacity'"
                )
            routed = routed_reference(xc, r, *ws)
        else:
            raise ValueError(f"MoE algorithm={impl!r}: allowed dropless, capacity, reference")
        out = routed.reshape(B, T, D)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.astype(x.dtype), self._stats(r, B, T, token_mask, dropped)

    def _stats(self, r: Routing, B: int, T: int, token_mask, dropped) -> MoEStats:
        cfg = self.cfg
        E, G = cfg.n_routed_experts, cfg.n_group
        mask = (
            jnp.ones((B, T), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
        )
        chosen = jax.nn.one_hot(r.experts, E, dtype=jnp.float32).sum(1).reshape(B, T, E)
        chosen = chosen * mask[..., None]  # [B, T, E] in {0, 1}
        normed = r.scores / r.scores.sum(-1, keepdims=True)  # s' (softmax is already normalised)
        normed = normed.reshape(B, T, E) * mask[..., None]
        in_group = chosen.reshape(B, T, G, E // G).max(-1)  # [B, T, G]
        return MoEStats(
            expert_counts=chosen.sum(1),
            score_sums=normed.sum(1),
            group_counts=in_group.sum(1),
            dropped=dropped,
            tokens=mask.sum(1),
        )
