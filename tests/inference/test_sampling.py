"""The sampler's distribution against softmax(logits / T) restricted by top-k / top-p (numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deepseek_jax.inference.sampling import sample

LOGITS = np.array([2.0, 1.5, 1.2, 0.4, 0.0, -0.3, -1.0, -2.5], np.float32)
DRAWS = 40_000


def expected(logits, t, k, p):
    """numpy: temperature, then the k largest, then the smallest top mass >= p, renormalised."""
    z = logits.astype(np.float64) / t
    order = np.argsort(-z, kind="stable")
    probs = np.exp(z - z.max())
    keep = np.zeros_like(probs, bool)
    keep[order[: (k or len(z))]] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    mass = 0.0
    final = np.zeros_like(keep)
    for i in order:
        if not keep[i] or mass >= p:
            break
        final[i] = True
        mass += probs[i]
    out = np.where(final, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize(
    "t, k, p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.6, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9), (0.5, 6, 0.95)],
)
def test_sampled_distribution_matches_filtered_softmax(t, k, p):
    keys = jax.random.split(jax.random.key(11), DRAWS)
    full = lambda v, dt: jnp.full((DRAWS,), v, dt)  # noqa: E731
    toks, lps = jax.jit(sample)(
        jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS))),
        keys,
        full(t, jnp.float32),
        full(k, jnp.int32),
        full(p, jnp.float32),
    )
    counts = np.bincount(np.asarray(toks), minlength=len(LOGITS))
    want = expected(LOGITS, t, k, p)
    assert counts[want == 0].sum() == 0, "a filtered token was drawn"
    support = want > 0
    chi2, pval = stats.chisquare(counts[support], want[support] * DRAWS)
    assert pval > 1e-3, (counts, want * DRAWS)
    # Raw log-probs: log_softmax(logits) whatever the filter.
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(LOGITS)))
    np.testing.assert_allclose(np.asarray(lps), raw[np.asarray(toks)], rtol=1e-6)
    # Power: the same counts reject the unfiltered T=1 softmax unless that is the target.
    naive = expected(LOGITS, 1.0, 0, 1.0)
    if not np.allclose(naive, want):
        _, p_naive = stats.chisquare(counts, np.maximum(naive, 1e-12) * DRAWS)
        assert p_naive < 1e-6


def test_temperature_zero_is_argmax_and_ignores_filters():
    logits = jax.random.normal(jax.random.key(0), (16, 50))
    toks, _ = sample(
        logits,
        jax.random.split(jax.random.key(1), 16),
        jnp.zeros(16),
        jnp.full(16, 3, jnp.int32),
        jnp.full(16, 0.1),
    )
    np.testing.assert_array_equal(np.asarray(toks), np.argmax(np.asarray(logits), -1))
