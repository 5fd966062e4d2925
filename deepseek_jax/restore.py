"""Building a DeepSeekModel from restored arrays, shared by the hub loader (`deepseek_jax.hf.load`)
and the Orbax layout (`deepseek_jax.orbax_layout`): the model's abstract state, each parameter's
target sharding, and the merge of the arrays back into a model.

The `deepseek_jax.hf` helpers used here (`partition_spec`, `fp8_params.install`) are imported
inside the functions: `deepseek_jax.hf` imports this module, so importing it at the top would make
a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.config import ModelConfig


def logical_axes(var) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (None for the routing bias)."""
    return var.get_metadata().get("logical_axes")


def _with_dtypes(cfg: ModelConfig, dtype, param_dtype) -> ModelConfig:
    name = jnp.dtype(jnp.float32 if dtype is None else dtype).name
    pname = jnp.dtype(param_dtype).name if param_dtype is not None else name
    return cfg.replace(dtype=name, param_dtype=pname)


def abstract_state(cfg: ModelConfig):
    """(graphdef, state of ShapeDtypeStructs) of DeepSeekModel(cfg), with no memory allocated."""
    from deepseek_jax.model import DeepSeekModel

    abstract = nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _sharding_fn(mesh: Mesh | None, rules: Mapping[str, Any] | None):
    if mesh is None:
        device = jax.devices()[0]
        return lambda path, var: jax.sharding.SingleDeviceSharding(device)
    from deepseek_jax.hf.mapping import DEFAULT_PARAM_RULES, partition_spec

    rules = DEFAULT_PARAM_RULES if rules is None else rules

    def fn(path, var):
        spec = partition_spec(logical_axes(var), var.shape, dict(mesh.shape), rules, path)
        return NamedSharding(mesh, spec)

    return fn


def _merge(graphdef, state, values: dict[tuple[str, ...], Any], fp8=None):
    """The model from `values` by path; `fp8` paths become Fp8Params (FP8 serving weights)."""
    from deepseek_jax.hf import fp8_params

    fp8 = fp8 or {}
    paths = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}
    given = set(values) | set(fp8)
    if paths != given:
        raise RuntimeError(
            f"parameter maps do not cover the model: missing {sorted(paths - given)[:3]}, "
            f"extra {sorted(given - paths)[:3]}"
        )
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    model = nnx.merge(graphdef, state)
    fp8_params.install(model, fp8)
    return model
