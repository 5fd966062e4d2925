"""Host-side pieces of the post-training driver: the row stream's resumable order, reward wiring,
the routing-bias switch (the bias update with main-stack-only counts: tests/test_model_tree.py)."""

import numpy as np
import pytest

from deepseek_jax.train.post_config import PostConfig
from deepseek_jax.train.post_run import RowStream, reward_functions


def test_row_stream_covers_each_epoch_and_resumes_exactly():
    rows = {"x": np.arange(10)}
    stream = RowStream(rows, 4, seed=3, shuffle=True)
    seen = [next(stream)["x"] for _ in range(5)]  # 20 rows = two epochs
    first_two_epochs = np.concatenate(seen)
    assert sorted(first_two_epochs[:10]) == list(range(10))
    assert sorted(first_two_epochs[10:]) == list(range(10))
    assert not np.array_equal(first_two_epochs[:10], first_two_epochs[10:])  # reshuffled

    replay = RowStream(rows, 4, seed=3, shuffle=True)
    next(replay), next(replay)
    state = replay.get_state()
    resumed = RowStream(rows, 4, seed=3, shuffle=True)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["x"], seen[2])
    # Fewer rows than a batch: rows repeat across epochs.
    small = RowStream({"x": np.arange(3)}, 8, seed=0, shuffle=False)
    np.testing.assert_array_equal(next(small)["x"], [0, 1, 2, 0, 1, 2, 0, 1])


def test_reward_functions_and_extra_callables():
    post = PostConfig(rewards=("accuracy", "format"), reward_weights=(1.0, 0.5))
    fns, weights = reward_functions(post, {"short": lambda c, ex: float(len(c) < 5)})
    assert list(fns) == ["accuracy", "format", "short"]
    assert weights == {"accuracy": 1.0, "format": 0.5, "short": 1.0}
    assert fns["accuracy"]("<think>x</think><answer>8</answer>", {"answer": "8"}) == 1.0


@pytest.mark.parametrize(
    "task,flag,want",
    [("sft", None, True), ("dpo", None, False), ("grpo", None, False), ("grpo", True, True)],
)
def test_routing_bias_update_defaults(task, flag, want):
    assert PostConfig(update_routing_bias=flag).routing_bias_updates(task) is want


@pytest.mark.parametrize("task", ["sft", "dpo", "grpo"])
def test_small_post_configs_load(task):
    import os

    from deepseek_jax.train.config import load_run_config

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_run_config(os.path.join(repo, "configs", f"train-{task}-small.yaml"))
    assert cfg.train.task == task
    assert os.path.isfile(os.path.join(repo, cfg.post.data))
    assert (cfg.train.init_from is None) == (task == "sft")
