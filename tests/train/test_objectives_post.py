"""SFT / DPO / GRPO objectives on a tiny V3: values and gradients against independent references,
the response-only SFT loss, and learning tests (SFT loss falls, the DPO margin rises)."""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.data import ByteTokenizer
from deepseek_jax.data.chat import SimpleChatTemplate, load_dpo, load_sft, pack_examples
from deepseek_jax.data.pipeline import DATA_DIR
from deepseek_jax.data.rollouts import rollout_batch
from deepseek_jax.losses import LossConfig
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.testing import MODEL_FP32, assert_close
from deepseek_jax.train.objectives_post import (
    NO_BALANCE,
    dpo_objective,
    dpo_reference,
    grpo_objective,
    grpo_reference,
    sft_objective,
)

# The numpy GRPO re-derivation lives in tests/test_rl.py (pytest's importlib mode has no sibling
# imports between test folders).
_spec = importlib.util.spec_from_file_location("_test_rl", Path(__file__).parents[1] / "test_rl.py")
_test_rl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_test_rl)
np_grpo = _test_rl.np_grpo

POST = DATA_DIR / "post"
T = 96
TEMPLATE = SimpleChatTemplate(ByteTokenizer())
_dpo_reference = nnx.jit(dpo_reference)
_grpo_reference = nnx.jit(grpo_reference)


@pytest.fixture(scope="module")
def model():
    # One MoE layer (few compiles), the byte vocabulary of ByteTokenizer, no MTP.
    cfg = load_preset("v3-tiny").replace(
        num_hidden_layers=1,
        first_k_dense_replace=0,
        num_nextn_predict_layers=0,
        vocab_size=259,
        remat="none",
    )
    return DeepSeekModel(cfg, rngs=nnx.Rngs(0))


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _full_logprobs(m, ids, labels, seg=None):
    """log_softmax of the full [B, T, V] logits, gathered: the plain reference."""
    logits = m(ids, segment_ids=seg).logits
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]


def _np_log_softmax_pick(logits, labels):
    z = np.asarray(logits, np.float64)
    ls = z - z.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    return np.take_along_axis(ls, np.asarray(labels)[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def sft_batch():
    examples = load_sft(POST / "sft_arith.jsonl", TEMPLATE, seq_len=T)[:6]
    return pack_examples(examples, seq_len=T, pad_id=TEMPLATE.pad_id)


def test_sft_loss_is_response_only_cross_entropy(model, sft_batch):
    graphdef, params, rest = _split(model)
    batch = {k: jnp.asarray(v) for k, v in sft_batch.items()}

    @jax.jit
    def value_and_grad(params, batch):
        def f(p):
            return sft_objective(nnx.merge(graphdef, p, rest), batch, loss_cfg=NO_BALANCE)

        return jax.value_and_grad(f, has_aux=True)(params)

    (loss, (metrics, stats)), grads = value_and_grad(params, batch)
    logits = nnx.jit(
        lambda m, b: (
            m(b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"]).logits
        )
    )(model, batch)
    mask = sft_batch["loss_mask"].astype(np.float64)
    nll = -_np_log_softmax_pick(logits, sft_batch["labels"])
    assert_close(loss, (nll * mask).sum() / mask.sum(), **MODEL_FP32)
    assert float(metrics["tokens"]) == mask.sum() and stats is not None
    # Prompt labels never enter the loss: changing all of them changes neither loss nor grads.
    perturbed = dict(batch)
    prompt = (sft_batch["loss_mask"] == 0) & (sft_batch["segment_ids"] > 0)
    assert prompt.sum() > mask.sum() / 2
    perturbed["labels"] = jnp.where(prompt, (batch["labels"] + 7) % 259, batch["labels"])
    (loss2, _), grads2 = value_and_grad(params, perturbed)
    assert float(loss2) == float(loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(a, b)
    # ...while a response label does change them.
    resp = dict(batch)
    r, t = np.argwhere(sft_batch["loss_mask"])[0]
    resp["labels"] = batch["labels"].at[r, t].add(1)
    assert float(value_and_grad(params, resp)[0][0]) != float(loss)


def _grpo_rollouts(seed=0):
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    prompts, comps, lps = [], [], []
    for i in range(4):
        p = TEMPLATE.render(
            [{"role": "user", "content": f"What is {i} + 1?"}], add_generation_prompt=True
        ).ids.tolist()
        c = tok.encode(f" <answer>{i + rng.integers(0, 3)}</answer>"[: 8 + 3 * i]) + [tok.eos_id]
        prompts.append(p)
        comps.append(c)
        lps.append(list(rng.normal(-5.5, 0.3, len(c))))
    adv = rng.normal(size=4).astype(np.float32)
    return rollout_batch(prompts, comps, lps, adv, seq_len=T, pad_id=tok.pad_id)


def test_grpo_objective_value_and_gradient(model):
    graphdef, params, rest = _split(model)
    batch = {k: jnp.asarray(v) for k, v in _grpo_rollouts().items()}
    batch.update(_grpo_reference(model, batch))
    # A reference that differs from the policy, so the KL term has a gradient.
    batch["ref_logp"] = batch["ref_logp"] + 0.2 * jnp.sin(jnp.arange(T))
    kw = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="grpo", chunk_size=16)

    @jax.jit
    def both(params):
        def obj(p):
            return grpo_objective(nnx.merge(graphdef, p, rest), batch, **kw)

        def full(p):  # per-token log-probs through the full logits
            m = nnx.merge(graphdef, p, rest)
            return _full_logprobs(m, batch["input_ids"], batch["labels"], batch["segment_ids"])

        (loss, aux), g = jax.value_and_grad(obj, has_aux=True)(params)
        logp, vjp = jax.vjp(full, params)
        return loss, aux, g, logp, vjp

    loss, (metrics, _), grads, logp, vjp = both(params)
    np_args = [np.asarray(batch[k]) for k in ("old_logp", "advantages", "loss_mask", "ref_logp")]
    old, adv, mask, ref = np_args
    want, dlogp = np_grpo(np.asarray(logp), old, adv, mask, ref, 0.04, 0.2, 0.28, "grpo")
    assert_close(loss, want, **MODEL_FP32)
    (want_grads,) = vjp(jnp.asarray(dlogp, jnp.float32))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(a, b, **MODEL_FP32)
    assert float(metrics["tokens"]) == mask.sum()
    assert float(metrics["entropy"]) > 0 and float(metrics["kl"]) > 0


def test_dpo_objective_value_and_gradient(model):
    graphdef, params, rest = _split(model)
    data = load_dpo(POST / "dpo_arith.jsonl", TEMPLATE, seq_len=T)
    batch = {k: jnp.asarray(v[:8]) for k, v in data.items()}
    batch.update(_dpo_reference(model, batch))
    batch["ref_chosen_logp"] = batch["ref_chosen_logp"] + jnp.linspace(-0.5, 0.5, 8)
    beta = 0.5

    @jax.jit
    def both(params):
        def obj(p):
            return dpo_objective(nnx.merge(graphdef, p, rest), batch, beta=beta, chunk_size=16)

        def full(p):  # summed response log-probs through the full logits: [2, B]
            m = nnx.merge(graphdef, p, rest)
            return jnp.stack(
                [
                    (
                        _full_logprobs(m, batch[f"{s}_input_ids"], batch[f"{s}_labels"])
                        * batch[f"{s}_loss_mask"]
                    ).sum(-1)
                    for s in ("chosen", "rejected")
                ]
            )

        (loss, aux), g = jax.value_and_grad(obj, has_aux=True)(params)
        seq, vjp = jax.vjp(full, params)
        return loss, aux, g, seq, vjp

    loss, (metrics, _), grads, seq, vjp = both(params)
    c, r = np.asarray(seq, np.float64)
    z = beta * ((c - np.asarray(batch["ref_chosen_logp"])) - (r - batch["ref_rejected_logp"]))
    assert_close(loss, np.mean(np.log1p(np.exp(-z))), **MODEL_FP32)
    assert_close(metrics["reward_margin"], z.mean(), **MODEL_FP32)
    s = 1 / (1 + np.exp(z)) / len(z)  # d loss / d z
    (want_grads,) = vjp(jnp.asarray(np.stack([-beta * s, beta * s]), jnp.float32))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(a, b, **MODEL_FP32)


def _train(model, objective, batches, steps, lr):
    """A plain optax loop over the objective; returns the metrics of every step."""
    graphdef, params, rest = _split(model)
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def f(p):
            return objective(nnx.merge(graphdef, p, rest), batch)

        (loss, (metrics, _)), g = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(metrics, loss=loss)

    history = []
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, batches[i % len(batches)])
        history.append(jax.tree.map(float, m))
    return history


def test_sft_learns_the_responses(model, sft_batch):
    batch = {k: jnp.asarray(v) for k, v in sft_batch.items()}
    hist = _train(
        model,
        functools.partial(sft_objective, loss_cfg=LossConfig(mtp_lambda=0.0)),
        [batch],
        steps=30,
        lr=3e-3,
    )
    first, last = hist[0]["main_loss"], hist[-1]["main_loss"]
    assert first > 4.0  # ~log(259) at initialisation
    assert last < 0.4 * first, (first, last)


def test_dpo_raises_the_margin(model):
    data = load_dpo(POST / "dpo_arith.jsonl", TEMPLATE, seq_len=T)
    batch = {k: jnp.asarray(v[:8]) for k, v in data.items()}
    batch.update(_dpo_reference(model, batch))  # the reference is the initial policy
    hist = _train(
        model, functools.partial(dpo_objective, beta=0.1, chunk_size=16), [batch], steps=20, lr=1e-3
    )
    assert abs(hist[0]["reward_margin"]) < 1e-4  # policy == reference at step 0
    assert hist[-1]["reward_margin"] > 1.0, hist[-1]
    assert hist[-1]["reward_accuracy"] == 1.0
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
