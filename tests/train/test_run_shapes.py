"""RunShapes: a run builds its abstract model and optimizer once and derives shapes, shardings,
parameter counts and the decay mask from them."""

import jax
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import load_preset
from deepseek_jax.train import optimizer as optimizer_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import TrainConfig, load_run_config
from deepseek_jax.train.loop import run
from deepseek_jax.train.step import RunShapes, _create

TINY = [
    "model.preset=v3-tiny",
    "model.num_hidden_layers=1",
    "model.first_k_dense_replace=0",
    "model.vocab_size=264",
    "model.remat=none",
    "model.num_nextn_predict_layers=0",
    "data.tokenizer=null",
    "data.seq_len=16",
    "data.global_batch_size=8",
    "mesh.rules=dp",
    "train.progress=false",
    "train.tensorboard=false",
    "train.log_every=1",
    "train.warmup_steps=0",
]


def test_abstract_state_equals_the_traced_initialiser():
    cfg = load_preset("v3-tiny").replace(num_hidden_layers=2)
    tcfg = TrainConfig(mu_dtype="bfloat16")
    shapes = RunShapes.build(cfg, tcfg, seed=3)
    traced = jax.eval_shape(lambda: _create(cfg, shapes.optimizer, 3))
    assert jax.tree.structure(shapes.state) == jax.tree.structure(traced)
    for a, b in zip(jax.tree.leaves(shapes.state), jax.tree.leaves(traced), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    with pytest.raises(ValueError, match="another model or train config"):
        step_lib.init_train_state(cfg.replace(num_hidden_layers=3), tcfg, shapes=shapes)


@pytest.fixture
def builds(monkeypatch):
    """Counts DeepSeekModel constructions (abstract ones under nnx.eval_shape included) and
    optimizer constructions."""
    n = {"model": 0, "optimizer": 0}
    init, make = model_lib.DeepSeekModel.__init__, optimizer_lib.make_optimizer

    def counting_init(self, *a, **k):
        n["model"] += 1
        init(self, *a, **k)

    def counting_make(*a, **k):
        n["optimizer"] += 1
        return make(*a, **k)

    monkeypatch.setattr(model_lib.DeepSeekModel, "__init__", counting_init)
    monkeypatch.setattr(step_lib, "make_optimizer", counting_make)
    return n


def test_a_run_builds_the_model_and_optimizer_once(tmp_path, builds):
    run(load_run_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.steps=1"]))
    # One abstract model (RunShapes: counts, shardings, init, the step; a resumed run restores
    # into its state) and the one real initialisation of the parameters.
    assert builds == {"model": 2, "optimizer": 1}


def test_shapes_keep_variable_types_and_metadata():
    shapes = RunShapes.build(load_preset("v3-tiny"), TrainConfig())
    axes = [v.get_metadata().get("logical_axes") for _, v in nnx.to_flat_state(shapes.params)]
    assert all(a is not None and a[0] in ("layers", "vocab", "embed", "norm") for a in axes)
    assert jax.tree.structure(shapes.decay_mask) == jax.tree.structure(shapes.state.params)
