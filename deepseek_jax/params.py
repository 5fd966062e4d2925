"""Parameter counts (total and activated per token), from the real module tree at zero memory."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.moe.router import RoutingBias


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Counts following the V3 report's convention.

    `total` and `activated` cover the main model (embedding, all layers, final norm, output head)
    and exclude the MTP modules, as the report's 671B / 37B do (the hub checkpoint's 685B adds
    the 14B MTP module). `activated` counts, per token, the shared experts and K of the E routed
    experts of every MoE layer plus everything that is not a routed expert; the router weights and
    the (non-trainable) selection bias count as activated. `mtp` is the MTP modules' total.
    """

    total: int
    activated: int
    mtp: int
    routed_expert: int  # parameters of all routed experts (main model)


def abstract_model(cfg: ModelConfig):
    """The model's variables as ShapeDtypeStructs (no memory allocated)."""
    from deepseek_jax.model import DeepSeekModel

    return nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig, *, model=None) -> ParamCount:
    """Counts of `cfg`'s model, or of `model` (e.g. a run's abstract model) when given."""
    model = abstract_model(cfg) if model is None else model

    def size(node) -> int:
        if node is None:
            return 0
        leaves = nnx.to_flat_state(nnx.state(node, (nnx.Param, RoutingBias)))
        return sum(math.prod(v.shape) for _, v in leaves)

    mtp = sum(size(getattr(model, k)) for k in model.param_groups()["mtp"])
    total = size(model) - mtp
    routed = sum(math.prod(v.shape) for v in model.routed_expert_params())
    inactive = 0
    if cfg.is_moe:
        inactive = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    return ParamCount(total=total, activated=total - inactive, mtp=mtp, routed_expert=routed)


def param_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
