"""Which parameters a run trains: everything, or only the MTP modules on a frozen main model.

`train.trainable: mtp` is the recipe for checkpoints whose MTP modules are missing or weak (they
serve as the draft model of speculative decoding, inference/speculative.py): the optimizer gives
every non-MTP parameter a zero gradient and a zero update (`restrict`), so the main
model stays bit-identical while the MTP loss trains the modules on the data. Gradient clipping and
AdamW see the MTP parameters only. `train.init_from` starts such a run from another run folder
(or hub / Orbax folder); parameters it lacks (e.g. the MTP modules) keep their fresh init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

TRAINABLE = ("all", "mtp")


def trainable_mask(model, trainable: str) -> dict:
    """True for the parameters a run trains: every one ("all"), or those of the MTP modules
    ("mtp"), found by identity among `model.param_groups()["mtp"]`'s variables.

    Args:
      model: the (abstract or real) DeepSeekModel.
      trainable: `TrainConfig.trainable`.
    Returns:
      A tree of bools shaped like `nnx.to_pure_dict(nnx.state(model, nnx.Param))`.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"train.trainable={trainable!r}: allowed {list(TRAINABLE)}")
    mtp = {
        id(v)
        for name in model.param_groups()["mtp"]
        if getattr(model, name) is not None
        for _, v in nnx.iter_graph(getattr(model, name))
        if isinstance(v, nnx.Variable)
    }
    flat = {
        path: trainable == "all" or id(v) in mtp
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    return traverse_util.unflatten_dict(flat)


def restrict(optimizer: optax.GradientTransformation, mask: dict):
    """The optimizer with zero updates wherever `mask` (`trainable_mask`) is False.

    The frozen parameters' gradients are zeroed before the optimizer (so clipping and Adam's
    moments see the trained ones only) and their updates after it (no weight decay). The state
    keeps the inner optimizer's structure over every parameter, so a checkpoint of a full run
    resumes as an MTP-only run and back.
    """
    if all(jax.tree.leaves(mask)):
        return optimizer

    def only_trained(tree):
        return jax.tree.map(lambda m, u: u if m else jnp.zeros_like(u), mask, tree)

    def update(updates, state, params=None):
        updates, state = optimizer.update(only_trained(updates), state, params)
        return only_trained(updates), state

    return optax.GradientTransformation(optimizer.init, update)


def load_initial_params(state, graphdef, path: str):
    """Replaces state.params / state.biases by those of the model at `path` where it has them.

    Args:
      state: a fresh TrainState (train/step.py); graphdef: its model graphdef;
      path: a run folder, hub folder or Orbax folder (as `python -m deepseek_jax.generate`).
    Returns:
      (state, number of arrays loaded, number kept from the fresh init).
    Raises:
      ValueError: naming the parameter whose shape differs from this run's model.
    """
    from flax import nnx

    from deepseek_jax.inference.cli import load_for_generation
    from deepseek_jax.moe.router import RoutingBias

    model, _, _ = load_for_generation(path)
    _, params, biases, _ = nnx.split(model, nnx.Param, RoutingBias, ...)
    loaded = {}
    for tree in (nnx.to_pure_dict(params), nnx.to_pure_dict(biases)):
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            loaded[jax.tree_util.keystr(p)] = leaf
    counts = [0, 0]

    def take(p, old):
        new = loaded.get(jax.tree_util.keystr(p))
        if new is None:
            counts[1] += 1
            return old
        if new.shape != old.shape:
            raise ValueError(
                f"train.init_from={path!r}: {jax.tree_util.keystr(p)} has shape {new.shape}, "
                f"this run's model needs {old.shape}"
            )
        counts[0] += 1
        return jax.device_put(new.astype(old.dtype), old.sharding)

    state = state._replace(
        params=jax.tree_util.tree_map_with_path(take, state.params),
        biases=jax.tree_util.tree_map_with_path(take, state.biases),
    )
    return state, counts[0], counts[1]
