"""DeepSeekMoE: the router, the dispatch plans, the routed experts and expert parallelism.

router.py          `Router`: affinities, (group-limited) top-k, gating weights,
                   `RoutingBias` and the aux-loss-free `bias_update`.
dispatch.py        single-device plans: the dropless sort (`routed_dropless`, `routed_blocked`)
                   and the capacity slots (`routed_capacity`, `capacity_slots`).
experts.py         the grouped SwiGLU every plan runs (`swiglu_grouped`, `swiglu_buffers`).
expert_parallel.py the routed experts under `jax.shard_map`: all-to-all exchanges
                   (ragged / ragged_emulated / capacity) around the same grouped SwiGLU.
reference.py       every expert on every token (the plain twin the tests hold the others to).
layer.py           the `MoE` module (shared + routed experts) and its `MoEStats`.
"""

from deepseek_jax.moe.dispatch import (
    capacity_slots,
    expert_capacity,
    routed_blocked,
    routed_capacity,
    routed_dropless,
)
from deepseek_jax.moe.experts import grouped_matmul, swiglu_buffers, swiglu_grouped
from deepseek_jax.moe.layer import MoE, MoEStats
from deepseek_jax.moe.reference import routed_reference
from deepseek_jax.moe.router import Router, Routing, RoutingBias, bias_update, route

__all__ = [
    "Router",
    "MoE",
    "MoEStats",
    "Routing",
    "RoutingBias",
    "bias_update",
    "capacity_slots",
    "expert_capacity",
    "grouped_matmul",
    "route",
    "routed_blocked",
    "routed_capacity",
    "routed_dropless",
    "routed_reference",
    "swiglu_buffers",
    "swiglu_grouped",
]
