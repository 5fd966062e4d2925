"""Post-training wired end to end: `train_main.py` with train.task=sft / dpo / grpo, the engine's
log-probs as GRPO's old log-probs, and a GRPO update on 8 devices equal to the single-device one.

The learning runs use a 2-layer tiny V3 (MLA, MoE) over byte tokens on a small arithmetic task
written here: 8 problems "a+b=" with single-digit answers (and one preference pair each for
DPO). The SFT data is deliberately noisy (each problem answered correctly 4 times out of 10,
wrongly otherwise), so the SFT-ed model is
right about 40% of the time whatever the SFT length, and GRPO has to find the right answers from
the accuracy reward alone. The runs go through `train_main.py` in subprocesses on one CPU device
that share a compilation cache; the GRPO run starts from the SFT run folder (`train.init_from`).
"""

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.data.chat import SimpleChatTemplate, load_prompts
from deepseek_jax.data.tokenizer import ByteTokenizer
from deepseek_jax.logprobs import token_logprobs
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.rules import get_rules
from deepseek_jax.testing import MODEL_FP32, assert_close
from deepseek_jax.train.config import load_run_config
from deepseek_jax.train.post_config import PostConfig
from deepseek_jax.train.post_run import (
    grpo_rollouts,
    objective_for,
    reward_functions,
    state_from_model,
)
from deepseek_jax.train.step import make_train_step, place_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBLEMS = [(1, 2), (3, 4), (2, 5), (4, 4), (0, 6), (5, 3), (1, 1), (6, 2)]
COMMON = [
    "model.preset=v3-tiny",
    "model.vocab_size=259",
    "model.num_hidden_layers=2",
    "model.num_nextn_predict_layers=0",
    "model.remat=none",
    "data.tokenizer=null",
    "data.seq_len=32",
    "mesh.rules=dp",
    "train.schedule=constant",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.progress=false",
    "checkpoint.every=0",
    "checkpoint.async_save=false",
]
GRPO_KEYS = (
    "reward_mean",
    "reward_std",
    "reward/accuracy_mean",
    "reward/accuracy_std",
    "reward/format_mean",
    "kl",
    "clip_fraction",
    "completion_length",
    "entropy",
    "rollout_s",
    "update_s",
    "tokens_per_s",
    "expert_load_max",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arith")
    rng = random.Random(0)
    with open(folder / "sft.jsonl", "w") as f:
        for a, b in PROBLEMS:
            wrong = rng.sample([d for d in range(10) if d != a + b], 6)
            for ans in [a + b] * 4 + wrong:
                user, reply = {"role": "user", "content": f"{a}+{b}="}, str(ans)
                messages = [user, {"role": "assistant", "content": reply}]
                f.write(json.dumps({"messages": messages}) + "\n")
    with open(folder / "grpo.jsonl", "w") as f, open(folder / "dpo.jsonl", "w") as g:
        for a, b in PROBLEMS:
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
            wrong = str((a + b + rng.randint(1, 9)) % 10)
            pair = {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": wrong}
            g.write(json.dumps(pair) + "\n")
    return folder


def _train_main(args, cache_dir, timeout=600):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_main.py"), *COMMON, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_run(arith, cache_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sft"))
    args = ["train.task=sft", f"post.data={arith / 'sft.jsonl'}", "data.global_batch_size=16"]
    args += ["train.steps=150", "train.lr=3e-3", f"train.run_dir={run_dir}"]
    _train_main(args, cache_dir)
    return run_dir


@pytest.mark.slow
def test_sft_run_lowers_the_response_loss(sft_run):
    hist = _metrics(sft_run)
    assert len(hist) == 150 and all(r["finite"] == 1.0 for r in hist)
    first, last = hist[0]["main_loss"], np.mean([r["main_loss"] for r in hist[-10:]])
    assert first > 4.0  # ~log(259) at initialisation
    # Targets: " ", the digit, <eos>; the noisy digit alone has entropy ~1.9 nats -> ~0.65/token.
    assert last < 1.0, (first, last)
    assert hist[-1]["bias_update_speed"] > 0  # SFT keeps the routing-bias update
    assert "expert_load_max" in hist[-1]
    with open(os.path.join(sft_run, "config.yaml")) as f:
        assert "task: sft" in f.read()


@pytest.mark.slow
def test_grpo_run_from_the_sft_run_raises_the_reward(sft_run, arith, cache_dir, tmp_path):
    run_dir = str(tmp_path / "grpo")
    args = ["train.task=grpo", f"post.data={arith / 'grpo.jsonl'}", f"train.init_from={sft_run}"]
    args += ["data.global_batch_size=64", "post.group_size=8", "post.max_new_tokens=3"]
    args += ["post.beta=0.04", "post.mu=2", "train.steps=24", "train.lr=3e-3"]
    _train_main(args + [f"train.run_dir={run_dir}"], cache_dir)
    hist = _metrics(run_dir)
    assert len(hist) == 24
    for key in GRPO_KEYS:
        assert key in hist[-1], key
    rewards = [r["reward_mean"] for r in hist]
    start, end = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert 0.15 < start < 0.7, rewards  # the SFT-ed model is right some of the time...
    assert end > start + 0.25 and end > 0.7, rewards  # ...and GRPO makes it right
    assert all(r["bias_update_speed"] == 0.0 for r in hist)  # frozen by default for GRPO
    # mu=2: the second update of each rollout batch sees ratios != 1 (and a KL to the reference).
    assert hist[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert any(r["kl"] > 0 for r in hist[1::2])
    assert all(r["rollout_s"] > 0 for r in hist[::2]) and all(
        r["rollout_s"] == 0 for r in hist[1::2]
    )
    assert os.listdir(os.path.join(run_dir, "tb"))  # TensorBoard events beside metrics.jsonl


@pytest.mark.slow
def test_dpo_run_raises_the_margin(sft_run, arith, cache_dir, tmp_path):
    run_dir = str(tmp_path / "dpo")
    args = ["train.task=dpo", f"post.data={arith / 'dpo.jsonl'}", f"train.init_from={sft_run}"]
    args += ["data.global_batch_size=8", "train.steps=12", "train.lr=1e-3"]
    _train_main(args + [f"train.run_dir={run_dir}"], cache_dir)
    hist = _metrics(run_dir)
    assert abs(hist[0]["reward_margin"]) < 1e-4  # the reference is the starting policy
    margins = [r["reward_margin"] for r in hist]
    # the margin grows at every step, by a factor > 5 after step 3 (the loss bound below then
    # needs a final margin of ~0.4: -log sigmoid(m) < 0.75 log 2)
    assert np.all(np.diff(margins) > 0) and margins[-1] > 5 * margins[2] > 0, margins
    assert hist[-1]["reward_accuracy"] == 1.0
    assert hist[-1]["loss"] < 0.75 * hist[0]["loss"]  # from log 2
    assert all(r["bias_update_speed"] == 0.0 for r in hist)


# ---- in-process checks on the SFT-ed model --------------------------------------------------
@pytest.fixture(scope="module")
def sft_model(sft_run):
    from deepseek_jax.inference.cli import load_run

    return load_run(sft_run)[0]


@pytest.fixture(scope="module")
def rollouts(sft_model, arith):
    template = SimpleChatTemplate(ByteTokenizer())
    records = load_prompts(arith / "grpo.jsonl", template)[:2]
    post = PostConfig(group_size=4, max_new_tokens=3)
    fns, weights = reward_functions(post)
    batch, metrics = grpo_rollouts(
        sft_model, records, template, post, seq_len=32, seed=3, reward_fns=fns,
        reward_weights=weights,
    )  # fmt: skip
    return batch, metrics


def test_engine_logprobs_equal_the_trainer_forward(sft_model, rollouts):
    batch, metrics = rollouts
    assert 0 < metrics["completion_length"] <= 3
    logp = token_logprobs(
        sft_model,
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["labels"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
    )
    mask = batch["loss_mask"].astype(bool)
    assert mask.sum() >= 8
    # The engine decodes over the latent cache; the trainer runs the training path: same fp32
    # log-probs of the sampled tokens.
    assert_close(np.asarray(logp)[mask], batch["old_logp"][mask], **MODEL_FP32)


@pytest.mark.slow
def test_grpo_step_on_8_devices_equals_one_device(sft_run, sft_model, rollouts):
    batch, _ = rollouts
    assert batch["input_ids"].shape[0] == 8
    cfg = load_run_config(
        os.path.join(sft_run, "config.yaml"),
        ["train.task=grpo", "post.group_size=4", "post.max_new_tokens=3", "post.beta=0.04"],
    )
    from deepseek_jax.train.objectives_post import grpo_reference

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch.update(jax.jit(grpo_reference)(sft_model, batch))
    batch["old_logp"] = batch["old_logp"] - 0.3 * batch["loss_mask"]  # ratios away from 1
    batch["ref_logp"] = batch["ref_logp"] + 0.2 * batch["loss_mask"]  # a KL term with a gradient
    objective, weights = objective_for(cfg)
    results = []
    for mesh_cfg in (None, MeshConfig(data=8, fsdp=1, rules="dp")):
        mesh = None if mesh_cfg is None else make_mesh(mesh_cfg)
        rules = None if mesh_cfg is None else get_rules(mesh_cfg.rules)
        graphdef, state = state_from_model(sft_model, cfg, mesh, rules)
        step = make_train_step(
            cfg.model, cfg.loss, cfg.train, graphdef, mesh=mesh, rules=rules,
            objective=objective, microbatch_weights=weights,
        )  # fmt: skip
        compiled = step.lower(state, batch).compile()
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            results.append(compiled(state, place_batch(batch, mesh, rules)))
    (one, m1), (eight, m8) = results
    assert max(x.sharding.num_devices for x in jax.tree.leaves(eight.params)) == 8
    for key in ("loss", "kl", "clip_fraction", "grad_norm", "entropy"):
        assert_close(m8[key], m1[key], **MODEL_FP32)
    assert float(m1["clip_fraction"]) > 0 and float(m1["kl"]) > 0
    jax.tree.map(lambda a, b: assert_close(a, b, **MODEL_FP32), eight.params, one.params)


def test_post_config_errors_name_the_field(arith):
    with pytest.raises(ValueError, match="train.task"):
        load_run_config(None, ["train.task=rlhf"])
    with pytest.raises(ValueError, match="post.data"):
        load_run_config(None, ["train.task=sft"])
    with pytest.raises(ValueError, match="post.group_size"):
        load_run_config(
            None,
            ["train.task=grpo", f"post.data={arith}/grpo.jsonl", "data.global_batch_size=12"],
        )
    with pytest.raises(ValueError, match="PostConfig.rewards"):
        PostConfig(rewards=("accuracy", "length"), reward_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="PostConfig.reward_weights"):
        PostConfig(reward_weights=(1.0,))
    # Pretraining configs keep their old shape (resuming an older run sees no new fields).
    d = load_run_config(None, []).to_dict()
    assert "post" not in d and "task" not in d["train"]
    cfg = load_run_config(None, ["train.task=dpo", f"post.data={arith}/sft.jsonl"])
    assert dataclasses.asdict(cfg.post)["dpo_beta"] == 0.1
    assert cfg.to_dict()["train"]["task"] == "dpo"
