"""Checkpoints: round trip, partial saves ignored, a corrupt latest step falls back (warning)."""

import os

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from deepseek_jax.train.checkpoint import Checkpointer
from deepseek_jax.train.config import CheckpointConfig


def _state(scale):
    params = {"w": jnp.full((4, 3), scale), "norm": {"weight": jnp.arange(3.0) * scale}}
    opt = optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    return {
        "step": jnp.int32(scale),
        "params": params,
        "opt_state": opt.init(params),
        "rng": jax.random.key_data(jax.random.key(int(scale))),
    }


def _saved(tmp_path, steps=(1, 2, 3)):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=5, async_save=True))
    for s in steps:
        ckpt.save(s, _state(float(s)), {"batches": s})
    ckpt.close()
    return Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=5))


def test_round_trip_restores_latest(tmp_path):
    ckpt = _saved(tmp_path)
    step, state, data = ckpt.restore(_state(0.0))
    assert step == 3 and data == {"batches": 3}
    chex.assert_trees_all_equal(state, _state(3.0))
    assert type(state["opt_state"]) is type(_state(0.0)["opt_state"])  # optax NamedTuples
    ckpt.close()


def test_empty_folder_restores_nothing(tmp_path):
    assert Checkpointer(str(tmp_path), CheckpointConfig()).restore(_state(0.0)) is None


def _corrupt(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if name in ("manifest.ocdbt", "_METADATA"):
                os.remove(os.path.join(root, name))


def test_corrupt_latest_falls_back_with_warning(tmp_path):
    ckpt = _saved(tmp_path)
    _corrupt(tmp_path / "3")
    # An interrupted async save leaves only a temporary folder: never a candidate.
    os.makedirs(tmp_path / "4.orbax-checkpoint-tmp-1234" / "state")
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 3 .* cannot be restored"):
        step, state, data = ckpt.restore(_state(0.0))
    assert step == 2 and data == {"batches": 2}
    chex.assert_trees_all_equal(state, _state(2.0))
    # The unreadable step is moved aside so that training can save step 3 again.
    assert 3 not in ckpt.all_steps()
    assert any(name.startswith("3.corrupt") for name in os.listdir(tmp_path))
    ckpt.save(3, _state(33.0), {"batches": 3}, wait=True)
    assert ckpt.restore(_state(0.0))[0] == 3
    ckpt.close()


def test_all_unreadable_is_an_error(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2))
    bigger = _state(0.0) | {"extra": jnp.zeros(2)}  # e.g. a changed config: nothing fits
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no checkpoint in"):
        ckpt.restore(bigger)
    assert ckpt.all_steps() == [1, 2]  # nothing was moved aside
    ckpt.close()
