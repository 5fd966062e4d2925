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


def _moe_state(scale, router="router"):
    params = {
        "moe_layers": {
            "ffn": {
                router: {"weight": jnp.full((4, 3), scale), "bias": jnp.arange(3.0) * scale},
                "shared": {"w_up": jnp.full((2, 3), -scale)},
            }
        },
    }
    return {"step": jnp.int32(scale), "params": params, "opt_state": optax.adam(1e-3).init(params)}


def test_a_step_written_before_the_router_rename_restores(tmp_path):
    """Run folders written until 2026-12-05 name the MoE router ffn/gate/* (params and the
    optimizer's moments): they restore into today's ffn/router/* state, checksums checked."""
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=5))
    ckpt.save(2, _moe_state(2.0, router="gate"), {"batches": 2}, wait=True)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=5))
    step, state, data = ckpt.restore(_moe_state(0.0))
    assert step == 2 and data == {"batches": 2}
    chex.assert_trees_all_equal(state, _moe_state(2.0))  # structure and types included
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


def _replicated(scale):
    """_state(scale) replicated over the 8 CPU devices, as data-parallel training holds it."""
    rep = jax.NamedSharding(jax.make_mesh((8,), ("data",)), jax.P())
    state = _state(scale)
    state["params"]["w"] = jnp.full((16, 8), scale)  # a dimension that 8 replicas can split
    return jax.device_put(state, rep)


def test_replicated_small_arrays_are_saved_whole(tmp_path, caplog):
    # Orbax's replica-parallel save slices each replicated array per replica with eager ops, one
    # compile per shape and device (~12 s per save of a tiny model); small arrays skip it.
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=5))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        ckpt.save(2, _replicated(2.0), {"batches": 2}, wait=True)
    assert not [r for r in caplog.records if "slice" in r.getMessage()]
    step, state, _ = ckpt.restore(_replicated(0.0))
    assert step == 2
    chex.assert_trees_all_equal(state, _replicated(2.0))
    assert state["params"]["w"].sharding.is_fully_replicated
    ckpt.close()


def test_restores_a_standard_save_checkpoint(tmp_path):
    # Checkpoints written before the state item moved from StandardSave to PyTreeSave (same files).
    import orbax.checkpoint as ocp

    from deepseek_jax.train.checkpoint import DataStateSave, array_checksums

    state = _replicated(4.0)
    manager = ocp.CheckpointManager(
        str(tmp_path),
        options=ocp.CheckpointManagerOptions(create=True),
        item_names=("state", "data", "meta"),
    )
    meta = {"step": 4, "checksums": array_checksums(state)}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataStateSave({"batches": 4}),
        meta=ocp.args.JsonSave(meta),
    )
    manager.save(4, args=args)
    manager.wait_until_finished()
    manager.close()
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
    step, restored, data = ckpt.restore(_replicated(0.0))
    assert (step, data) == (4, {"batches": 4})
    chex.assert_trees_all_equal(restored, state)


def test_round_trip_with_orbax_default_handler(tmp_path, monkeypatch):
    # The save-time tuning needs a private orbax module; without it (a later orbax) the state is
    # written by orbax's own handler, and a checkpoint of either kind restores.
    from deepseek_jax.train import checkpoint

    tuned = Checkpointer(str(tmp_path), CheckpointConfig(keep=5))
    tuned.save(1, _replicated(1.0), {"batches": 1}, wait=True)
    tuned.close()
    monkeypatch.setattr(checkpoint, "array_metadata_store", None)
    plain = Checkpointer(str(tmp_path), CheckpointConfig(keep=5))
    assert plain.restore(_replicated(0.0))[0] == 1
    plain.save(2, _replicated(2.0), {"batches": 2}, wait=True)
    step, state, data = plain.restore(_replicated(0.0))
    assert step == 2 and data == {"batches": 2}
    chex.assert_trees_all_equal(state, _replicated(2.0))
    plain.close()
