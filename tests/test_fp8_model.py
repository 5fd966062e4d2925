"""The FP8 switch: linear layers and routed experts through the block-scaled FP8 kernels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.model import DeepSeekModel


def test_fp8_model_tracks_high_precision_and_trains(tiny_cfg):
    ref = DeepSeekModel(tiny_cfg, rngs=nnx.Rngs(0))
    fp8 = DeepSeekModel(tiny_cfg.replace(fp8=True), rngs=nnx.Rngs(0))  # same weights
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, tiny_cfg.vocab_size)
    a, b = ref(ids).logits, fp8(ids).logits
    # E4M3 keeps 3 mantissa bits: rounding error <= 2^-4 relative, RMS 2^-4/sqrt(3) per operand,
    # so one matmul of two quantised operands carries ~sqrt(2/3) * 2^-4 = 5.1% RMS relative error.
    # Through the residual stream the logits must stay within two such matmul errors, and must
    # differ at all (the FP8 path really ran). Loss-level parity is the training test's job.
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    per_matmul = (2 / 3) ** 0.5 * 2**-4
    assert 1e-3 < rel < 2 * per_matmul, rel
    graphdef, params, rest = nnx.split(fp8, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids).logits.std()))(params)
    chex.assert_tree_all_finite(grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(np.asarray(jnp.isfinite(b)), True)
