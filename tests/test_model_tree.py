"""The model owns its parameter tree: weight decay by variable type, the routing-bias update and
the MoE stacks' order through model methods, never through attribute names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.moe.router import RoutingBias
from deepseek_jax.norm import NormScale, RMSNorm
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.optimizer import weight_decay_mask
from deepseek_jax.train.step import init_train_state


@pytest.fixture(scope="module")
def tiny():
    # 1 dense + 2 MoE layers + 1 MTP module, 8 experts
    cfg = load_preset("v3-tiny").replace(num_hidden_layers=3, remat="none")
    graphdef, state = init_train_state(cfg, TrainConfig())  # compiled for speed on CPU
    return nnx.merge(graphdef, state.params, state.biases, state.other)


def _no_decay(mask):
    return {k for k, v in nnx.traversals.flatten_mapping(mask).items() if not v}


def test_every_norm_scale_and_nothing_else_escapes_decay(tiny):
    params = nnx.state(tiny, nnx.Param)
    norms = {p for p, v in nnx.to_flat_state(params) if isinstance(v, NormScale)}
    # final; per layer stack attn, ffn, q, kv (x2); MTP enorm, hnorm, norm and its block's 4
    assert len(norms) == 16
    assert _no_decay(weight_decay_mask(params)) == norms


class Renamed(nnx.Module):
    """Names no path-based rule would recognise: a norm that is not called *norm, and a stacked
    (2-d) norm scale, which a rule on 1-d parameters would miss too."""

    def __init__(self):
        self.pre_scale = RMSNorm(4, eps=1e-6)
        self.stacked = NormScale(jnp.ones((3, 4)))
        self.bias = nnx.Param(jnp.ones((2, 4)))  # a trained matrix called "bias" is decayed
        self.w = nnx.Param(jnp.ones((4, 4)))


def test_decay_mask_follows_types_not_names():
    mask = weight_decay_mask(nnx.state(Renamed(), nnx.Param))
    assert mask == {"pre_scale": {"weight": False}, "stacked": False, "bias": True, "w": True}


def test_moe_stacks_are_in_moe_stats_order(tiny):
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, tiny.cfg.vocab_size)
    out = nnx.jit(lambda m, x: m(x))(tiny, ids)
    _, main = nnx.jit(lambda m, x: m.final_hidden(x))(tiny, ids)
    stacks = tiny.moe_stacks()
    rows = [jax.tree.leaves(nnx.state(s, RoutingBias))[0].shape[0] for s in stacks]
    assert rows == [2, 1] and out.moe_stats.expert_counts.shape[0] == 3
    # The main stack's rows come first, as apply_bias_update assumes.
    np.testing.assert_array_equal(out.moe_stats.expert_counts[:2], main.expert_counts)
    dense = load_preset("dense-small")
    assert nnx.eval_shape(lambda: DeepSeekModel(dense, rngs=nnx.Rngs(0))).moe_stacks() == []


def test_apply_bias_update_by_hand(tiny):
    model = nnx.clone(tiny)
    E = model.cfg.n_routed_experts
    counts = np.zeros((3, E), np.float32)
    counts[0, 0] = 8.0  # layer 0: expert 0 overloaded, the rest idle
    counts[1] = 1.0  # layer 1: balanced
    counts[2, 1:] = 2.0  # MTP layer: expert 0 idle
    model.apply_bias_update(jnp.asarray(counts), 0.5)
    main, mtp = (jax.tree.leaves(nnx.state(s, RoutingBias))[0] for s in model.moe_stacks())
    # b += gamma * sign(mean - load)
    np.testing.assert_allclose(main[0], [-0.5] + [0.5] * (E - 1))
    np.testing.assert_allclose(main[1], 0.0)
    np.testing.assert_allclose(mtp[0], [0.5] + [-0.5] * (E - 1))
    # Main-stack counts only (DPO / GRPO skip the MTP modules): the MTP bias stays.
    model.apply_bias_update(jnp.asarray(counts[:2]), 0.5)
    np.testing.assert_allclose(
        jax.tree.leaves(nnx.state(model.moe_stacks()[1], RoutingBias))[0], mtp
    )
    with pytest.raises(ValueError, match="cover 3 MoE layers but the counts have 4"):
        model.apply_bias_update(jnp.zeros((4, E)), 0.5)


def test_pipeline_stack_and_groups_name_real_attributes(tiny):
    assert tiny.pipeline_stack() == "moe_layers"
    dense = load_preset("dense-small")
    assert nnx.eval_shape(lambda: DeepSeekModel(dense, rngs=nnx.Rngs(0))).pipeline_stack() == (
        "dense_layers"
    )
    names = [n for group in tiny.param_groups().values() for n in group]
    top = {p[0] for p, _ in nnx.to_flat_state(nnx.state(tiny, (nnx.Param, RoutingBias)))}
    assert set(names) == top  # every top-level part is in exactly one group
    assert len(names) == len(set(names))
