"""DeepSeekMoE routing: affinity scores, (group-limited) top-k selection and gating weights.

V3 report eq. 13-16: s_{i,t} = sigmoid(u_t^T e_i); the selection uses s_{i,t} + b_i (the
aux-loss-free balancing bias, Sec. 2.1.2) but the gating weight uses the unbiased s_{i,t},
g_{i,t} = s_{i,t} / sum_{j in topk} s_{j,t}, times `routed_scaling_factor`. Node-limited routing
keeps the `topk_group` groups whose score (sum of their top-2 biased affinities) is highest.

V2 report eq. 9-11: s_{i,t} = softmax_i(u_t^T e_i); `greedy` takes the top-k of all experts,
`group_limited_greedy` first keeps the `topk_group` groups with the highest max affinity
(device-limited routing, Sec. 2.2.2). Released V2 checkpoints do not normalise (norm_topk_prob
false) and scale by routed_scaling_factor, which is what we do; normalisation, when asked for, is
applied before the scaling.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import param


class Routing(NamedTuple):
    weights: jax.Array  # [M, K] float32 gating weights g
    experts: jax.Array  # [M, K] int32 selected expert ids
    scores: jax.Array  # [M, E] float32 affinities s (unbiased)


class RoutingBias(nnx.Variable):
    """The aux-loss-free selection bias b (V3 Sec. 2.1.2): not trained by gradients.

    A Variable type of its own so that optimizers (which take nnx.Param) never see it and the
    training step updates it with `bias_update` from global expert loads.
    """


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Selects `num_experts_per_tok` experts per token from router logits [M, E] (fp32)."""
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    logits = logits.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]  # [M, E]
    if cfg.topk_method in ("noaux_tc", "group_limited_greedy") and G > 1:
        grouped = choice.reshape(-1, G, E // G)  # [M, G, E/G]
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [M, G]
        else:
            group_score = grouped.max(-1)  # [M, G]
        _, keep_groups = jax.lax.top_k(group_score, cfg.topk_group)  # [M, topk_group]
        group_mask = (
            jnp.zeros_like(group_score)
            .at[jnp.arange(group_score.shape[0])[:, None], keep_groups]
            .set(1.0)
        )
        expert_mask = jnp.repeat(group_mask, E // G, axis=-1) > 0  # [M, E]
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, K)  # [M, K]
    weights = jnp.take_along_axis(scores, experts, axis=-1)  # [M, K], unbiased
    if cfg.norm_topk_prob and K > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return Routing(weights, experts.astype(jnp.int32), scores)


class Router(nnx.Module):
    """Router weights e_i [D, E] and, for V3, the selection bias b [E] (kept in fp32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", None), cfg)
        if cfg.topk_method == "noaux_tc":
            self.bias = RoutingBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> Routing:
        """x [M, D] -> routing of each of the M tokens. The router runs in fp32 (V3 Sec. 3.3.1)."""
        logits = jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))  # [M, E]
        bias = None if self.bias is None else self.bias[...]
        return route(logits, bias, self.cfg)


def bias_update(bias: jax.Array, expert_counts: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """Aux-loss-free balancing step (V3 Sec. 2.1.2): b_i += gamma * sign(mean_load - load_i).

    Args:
      bias: [..., E] float32 selection biases (e.g. [L_moe, E] for all MoE layers).
      expert_counts: [..., E] tokens routed to each expert, summed over the *global* batch (all
        data-parallel shards), so every replica applies the same update.
      gamma: bias update speed (0.001 in V3; 0 for the last 500B tokens).
    Returns:
      The updated biases, float32.
    """
    load = expert_counts.astype(jnp.float32)
    mean = load.mean(axis=-1, keepdims=True)
    return (bias + gamma * jnp.sign(mean - load)).astype(jnp.float32)
