"""rollout_batch: completions and the sampler's log-probs land on the completion label positions."""

import numpy as np
import pytest

from deepseek_jax.data.rollouts import rollout_batch


def test_layout_by_hand():
    prompts = [[1, 10, 11], [1, 12]]
    comps = [[20, 21, 2], [22]]
    lps = [[-0.1, -0.2, -0.3], [-0.4]]
    b = rollout_batch(prompts, comps, lps, np.array([0.5, -1.0]), seq_len=6, pad_id=0)
    np.testing.assert_array_equal(b["input_ids"][0], [1, 10, 11, 20, 21, 0])
    np.testing.assert_array_equal(b["labels"][0], [10, 11, 20, 21, 2, 0])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(b["old_logp"][0], [0, 0, -0.1, -0.2, -0.3, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["input_ids"][1], [1, 12, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["labels"][1], [12, 22, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(b["advantages"], [0.5, -1.0])
    # Every label under the mask is a completion token, in order.
    for r, c in enumerate(comps):
        np.testing.assert_array_equal(b["labels"][r][b["loss_mask"][r] == 1], c)


def test_per_token_advantages():
    adv = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = rollout_batch(
        [[1, 5], [1]], [[6, 7], [8, 9, 2]], [[0, 0], [0, 0, 0]], adv, seq_len=5, pad_id=0
    )
    np.testing.assert_allclose(b["advantages"][0], [0, 0, 1, 0, 0])
    np.testing.assert_allclose(b["advantages"][1], [4, 5, 6, 0, 0])


def test_errors_name_the_rollout():
    with pytest.raises(ValueError, match="rollout 1: 2 completion tokens but 1 log-probs"):
        rollout_batch([[1], [1]], [[2], [3, 4]], [[0], [0]], np.zeros(2), seq_len=4, pad_id=0)
    with pytest.raises(ValueError, match="rollout 0: 3 \\+ 3 tokens do not fit seq_len=4"):
        rollout_batch([[1, 2, 3]], [[4, 5, 6]], [[0, 0, 0]], np.zeros(1), seq_len=4, pad_id=0)
    with pytest.raises(ValueError, match="rollout 0: empty prompt"):
        rollout_batch([[]], [[4]], [[0]], np.zeros(1), seq_len=4, pad_id=0)
    with pytest.raises(ValueError, match="advantages has shape \\(3,\\)"):
        rollout_batch([[1]], [[4]], [[0]], np.zeros(3), seq_len=4, pad_id=0)
