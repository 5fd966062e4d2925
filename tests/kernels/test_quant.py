"""E4M3 fine-grained quantization: scales, round-trip error bounds, ragged edges."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels import quant

# E4M3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative for normal values. Below the
# smallest normal (2^-6) values are subnormal with spacing 2^-9, so the absolute error there is at
# most 2^-10 -- in units of the tile's scale, since x_fp8 = x / scale.
_REL = 2.0**-4
_SUBNORMAL_ABS = 2.0**-10
_SLACK = 1 + 2.0**-20  # the fp32 division x / scale and the product x_fp8 * scale


def _bound(x, scale_per_element):
    return (_REL * np.abs(x) + _SUBNORMAL_ABS * scale_per_element) * _SLACK


def _expected_scale(amax):
    """scale = amax * fl(1/448), bit for bit (see quant.scale_from_amax); 1 for all-zero tiles."""
    amax = np.asarray(amax, np.float32)
    scale = amax * np.float32(1.0 / 448.0)
    # Within 1 ulp of the correctly rounded quotient.
    assert np.all(np.abs(scale - amax / np.float32(448.0)) <= np.spacing(scale))
    return np.where(amax == 0, np.float32(1.0), scale)


def _tiles_amax(x, block):
    """numpy: amax of 1 x block tiles along the last axis (zero padded)."""
    k = x.shape[-1]
    kb = -(-k // block)
    xp = np.zeros(x.shape[:-1] + (kb * block,), np.float32)
    xp[..., :k] = np.abs(x)
    return xp.reshape(*x.shape[:-1], kb, block).max(-1)


def _inputs(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    # Log-uniform magnitudes exercise normal and subnormal E4M3 ranges within one tile.
    mag = np.exp(rng.uniform(-12, 4, size=shape))
    return jnp.asarray(mag * rng.choice([-1.0, 1.0], size=shape), dtype)


@pytest.mark.parametrize("shape", [(3, 300), (5, 128), (2, 7), (2, 3, 129)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_round_trip_within_e4m3_precision(shape, dtype):
    x = _inputs(shape, dtype=dtype)
    q, s = quant.quantize_activation(x)
    chex.assert_shape(q, shape)
    chex.assert_shape(s, shape[:-1] + (-(-shape[-1] // 128),))
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    x_hat = np.asarray(quant.dequantize_activation(q, s))
    s_el = np.asarray(quant.repeat_scale(s, shape[-1], block_size=128))
    xf = np.asarray(x, np.float32)
    assert np.all(np.abs(x_hat - xf) <= _bound(xf, s_el))


@pytest.mark.parametrize("block", [128, 32])
def test_scale_is_amax_over_448(block):
    x = np.array(_inputs((4, 200), seed=1))
    x[1] = 0.0  # an all-zero row: every tile's amax is 0, and the scale falls back to 1
    _, s = quant.quantize_activation(jnp.asarray(x), block_size=block)
    np.testing.assert_array_equal(np.asarray(s), _expected_scale(_tiles_amax(x, block)))


def test_largest_element_maps_to_448_and_nothing_overflows():
    x = jnp.asarray([[3.0, -7.0, 1e-3, 0.5], [1e30, -1e30, 2.0, 0.0]], jnp.float32)
    q, s = quant.quantize_activation(x, block_size=4)
    qf = np.asarray(q, np.float32)
    assert np.all(np.isfinite(qf))
    np.testing.assert_array_equal(np.abs(qf).max(-1), [448.0, 448.0])


def test_power_of_two_scales():
    x = _inputs((6, 260), seed=2)
    q, s = quant.quantize_activation(x, power_of_two_scale=True)
    s = np.asarray(s)
    mant, _ = np.frexp(s)
    np.testing.assert_array_equal(mant, 0.5)  # exactly 2^e
    exact = _expected_scale(_tiles_amax(np.asarray(x), 128))
    assert np.all(s >= exact) and np.all(s < 2 * exact)
    x_hat = np.asarray(quant.dequantize_activation(q, jnp.asarray(s)))
    s_el = np.repeat(s, 128, axis=-1)[:, :260]
    assert np.all(np.abs(x_hat - np.asarray(x)) <= _bound(np.asarray(x), s_el))


def test_round_up_to_power_of_two_is_exact():
    s = jnp.asarray([1.0, 0.75, 2.0**-20, 3.0, 2.0**-20 * 1.000001], jnp.float32)
    out = np.asarray(quant.round_up_to_power_of_two(s))
    np.testing.assert_array_equal(out, [1.0, 1.0, 2.0**-20, 4.0, 2.0**-19])


def test_tiles_along_axis0_are_transposed_row_tiles():
    x = _inputs((300, 5), seed=3)
    q0, s0 = quant.quantize_activation(x, axis=0)
    qt, st = quant.quantize_activation(x.T)
    chex.assert_shape(s0, (3, 5))
    np.testing.assert_array_equal(np.asarray(q0, np.float32), np.asarray(qt.T, np.float32))
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(st.T))
    back = quant.dequantize_activation(q0, s0, axis=0)
    np.testing.assert_array_equal(
        np.asarray(back), np.asarray(quant.dequantize_activation(qt, st).T)
    )


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 64, 72)])
def test_weight_round_trip_and_block_scales(shape):
    w = _inputs(shape, seed=4)
    q, s = quant.quantize_weight(w)
    *lead, k, n = shape
    chex.assert_shape(s, (*lead, -(-k // 128), -(-n // 128)))
    wf = np.asarray(w)
    # Block amax by hand, zero padded.
    kp, np_ = s.shape[-2] * 128, s.shape[-1] * 128
    wp = np.zeros((*lead, kp, np_), np.float32)
    wp[..., :k, :n] = np.abs(wf)
    amax = wp.reshape(*lead, kp // 128, 128, np_ // 128, 128).max(axis=(-3, -1))
    np.testing.assert_array_equal(np.asarray(s), _expected_scale(amax))
    w_hat = np.asarray(quant.dequantize_weight(q, s))
    s_el = np.repeat(np.repeat(np.asarray(s), 128, -2), 128, -1)[..., :k, :n]
    assert np.all(np.abs(w_hat - wf) <= _bound(wf, s_el))


def test_quantize_dequantize_activation_matches_two_steps():
    x = _inputs((4, 140), seed=5)
    q, s = quant.quantize_activation(x, block_size=64)
    chex.assert_trees_all_equal(
        quant.quantize_dequantize_activation(x, block_size=64),
        quant.dequantize_activation(q, s, block_size=64),
    )


def test_errors_name_the_argument():
    x = jnp.ones((2, 256))
    with pytest.raises(ValueError, match="block_size=0"):
        quant.quantize_activation(x, block_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize_activation(jnp.ones((2, 3), jnp.int32))
    q, s = quant.quantize_activation(x)
    with pytest.raises(ValueError, match="scale.shape"):
        quant.dequantize_activation(q, s[:, :1].repeat(3, axis=1))
    with pytest.raises(ValueError, match=r"\[\.\.\., K, N\]"):
        quant.quantize_weight(jnp.ones((4,)))
