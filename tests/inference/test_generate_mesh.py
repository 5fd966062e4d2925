"""Generation on 8 emulated CPU devices (weights FSDP-sharded, batch and cache over data x fsdp)
gives the same tokens as on one device."""

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.inference import generate
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.rules import get_rules, param_shardings
from deepseek_jax.testing import MODEL_FP32, assert_close

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 70, 8, 11], [100, 4, 6, 31, 2, 9, 9, 12, 64, 3]]
KW = dict(max_new_tokens=6, temperature=[0.0, 1.0, 0.7], top_k=[0, 0, 8], seed=2)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
def test_eight_devices_give_the_tokens_of_one(tiny_cfg, tiny_model):
    one = generate(tiny_model, PROMPTS, **KW)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, rules="fsdp"))
    rules = get_rules("fsdp")
    graphdef, state = nnx.split(tiny_model)
    sharded = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh, rules)))
    many = generate(sharded, PROMPTS, mesh=mesh, rules=rules, **KW)
    assert many.stats["buckets"]["batch"] == 8  # rounded up to the data x fsdp split
    assert many.tokens == one.tokens and many.finish_reasons == one.finish_reasons
    for a, b in zip(many.logprobs, one.logprobs, strict=True):
        assert_close(np.array(a), np.array(b), **MODEL_FP32)
