"""Notebooks 03 (pre-training) and 06 (post-training: SFT, then GRPO)."""

from __future__ import annotations

from .common import install_cell

CELLS_PRETRAIN = [
    (
        "md",
        "# Pre-training the default model\n\n`python train_main.py` trains the small V3 "
        "(MLA + group-limited sigmoid MoE + MTP, configs/train-v3-small.yaml) on the Python docs "
        "shipped with the package. Here the same loop runs in-process for a short run, then "
        "`deepseek_jax.report` draws what it logged: the losses, the expert load of every MoE "
        "layer over the steps (the aux-loss-free bias balancing at work), the dropped fraction "
        "and the throughput.",
    ),
    install_cell(),
    (
        "code",
        "import os, tempfile\nimport numpy as np\n"
        "from IPython.display import display\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.train.config import load_run_config\n"
        "from deepseek_jax.train.loop import run\n"
        "run_dir = os.path.join(tempfile.mkdtemp(prefix='dj-run-'), 'v3-small')\n"
        "overrides = [f'train.run_dir={run_dir}', 'train.progress=false', 'checkpoint.every=0']\n"
        "if SMALL:  # a 2-layer tiny V3 on the same tokenizer and corpus\n"
        "    overrides += ['model.preset=v3-tiny', 'model.num_hidden_layers=2', "
        "'model.vocab_size=2048',\n"
        "                  'data.seq_len=64', 'train.steps=40', 'train.warmup_steps=4', "
        "'train.log_every=2']\n"
        "else:  # the default model and batch (8 x 256), 150 of the default run's 300 steps\n"
        "    overrides += ['train.steps=150', 'train.warmup_steps=15', 'train.log_every=5']\n"
        "cfg = load_run_config(None, overrides)\n"
        "summary = run(cfg)\n"
        "print({k: summary[k] for k in ('steps', 'first_loss', 'last_loss', 'tokens_per_s')})",
    ),
    ("md", "## The one-page report\nThe same figure as `python -m deepseek_jax.report RUN_DIR`."),
    (
        "code",
        "records = report.read_metrics(run_dir)\n"
        "fig, contents = report.run_figure(records, title='v3-small')\n"
        "display(fig)\nreport.pyplot().close(fig)\n"
        "for panel, names in contents.items():\n"
        "    print(f'{panel:22s} {names}')\n"
        "_, loss = report.series(records, 'loss')\n"
        "assert loss[-1] < loss[0] - 0.5, loss  # it learns\n"
        "assert contents['losses'][:3] == ['loss', 'main_loss', 'mtp_loss']",
    ),
    (
        "md",
        "## Expert load over the steps\nEach MoE layer's `expert_load` is every expert's share "
        "of that layer's (token, expert) assignments at a logged step (uniform = 1/E). Every "
        "step the selection bias of an overloaded expert moves down, of an underloaded one up, "
        "by `train.bias_update_speed` (V3's aux-loss-free balancing; no gradient involved). Over "
        "the full-size run the spread of the shares shrinks several-fold (asserted below; "
        "measured 0.78 -> 0.12 over 150 steps); the reduced run of the test suite is too short "
        "for it.",
    ),
    (
        "code",
        "steps, load = report.layer_series(records, 'expert_load')  # [S, L, E]\n"
        "plt = report.pyplot()\n"
        "fig, axes = plt.subplots(1, load.shape[1], figsize=(6 * load.shape[1], 3.5))\n"
        "for layer, ax in enumerate(np.atleast_1d(axes)):\n"
        "    report.plot_expert_load(ax, records, layer)\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-5)  # shares of each layer\n"
        "E = load.shape[-1]\n"
        "spread = load.std(-1).mean(-1) * E  # over layers; 0 = perfectly even\n"
        "quarter = max(1, len(steps) // 4)\n"
        "early, late = spread[:quarter].mean(), spread[-quarter:].mean()\n"
        "print(f'load spread (std / mean share): first quarter {early:.3f}, "
        "last quarter {late:.3f}')\n"
        "if not SMALL:\n"
        "    assert late < 0.5 * early  # the bias evens the load out",
    ),
    ("md", "## Dropped tokens and throughput"),
    (
        "code",
        "fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))\n"
        "dropped = report.plot_dropped(ax1, records)\n"
        "rates = report.plot_throughput(ax2, records)\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "_, d = report.layer_series(records, 'dropped')\n"
        "_, tps = report.series(records, 'tokens_per_s')\n"
        "print(f'dropped fraction max {d.max():.3f}; tokens/s median {np.median(tps):.0f}')\n"
        "assert cfg.model.moe_impl == 'dropless' and d.max() == 0.0  # V3 drops nothing\n"
        "assert np.median(tps) > 0\n"
        "print('model.moe_impl=capacity model.capacity_factor=1.0 shows tokens being dropped')",
    ),
    (
        "md",
        "TensorBoard reads the same run: `tensorboard --logdir RUN_DIR/tb` (scalars, and the "
        "expert load as one histogram per layer).",
    ),
]

# ----------------------------------------------------------------------------- 04 generation

CELLS_POST = [
    (
        "md",
        "# Post-training: SFT, then GRPO with a rule-based reward\n\n`train.task=sft` and "
        "`train.task=grpo` run the same `train_main.py` loop (deepseek_jax/train/post_run.py). "
        "Here, on an arithmetic task small enough for a CPU: 8 problems `a+b=` with "
        "single-digit answers, a 2-layer tiny V3 (MLA + MoE) over byte tokens. The SFT "
        "dialogues are deliberately noisy (each problem answered correctly 4 times in 10), so "
        "the SFT-ed model is right about 40% of the time; GRPO (DeepSeekMath Sec. 4.1) then "
        "samples groups of answers with the generation engine, scores them with the accuracy "
        "reward alone and raises it. (The same task as tests/train/test_post_training.py; "
        "configs/train-sft-small.yaml and train-grpo-small.yaml run the R1-format version on "
        "data/post/.)",
    ),
    install_cell(),
    (
        "code",
        "import json, os, random, tempfile\n"
        "if SMALL:  # CI: one CPU device, unoptimised XLA code generation (compiling dominates)\n"
        "    os.environ['XLA_FLAGS'] = '--xla_backend_optimization_level=0'\n"
        "import numpy as np\n"
        "from IPython.display import display\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.train.config import load_run_config\n"
        "from deepseek_jax.train.loop import run\n"
        "work = tempfile.mkdtemp(prefix='dj-post-')\n"
        "PROBLEMS = [(1, 2), (3, 4), (2, 5), (4, 4), (0, 6), (5, 3), (1, 1), (6, 2)]\n"
        "rng = random.Random(0)\n"
        "with open(f'{work}/sft.jsonl', 'w') as f:  # chat dialogues: 4 right, 6 wrong answers\n"
        "    for a, b in PROBLEMS:\n"
        "        for ans in [a + b] * 4 + rng.sample([d for d in range(10) if d != a + b], 6):\n"
        "            messages = [{'role': 'user', 'content': f'{a}+{b}='},\n"
        "                        {'role': 'assistant', 'content': str(ans)}]\n"
        "            f.write(json.dumps({'messages': messages}) + '\\n')\n"
        "with open(f'{work}/grpo.jsonl', 'w') as f:  # prompts with their reference answers\n"
        "    for a, b in PROBLEMS:\n"
        "        f.write(json.dumps({'prompt': f'{a}+{b}=', 'answer': str(a + b)}) + '\\n')\n"
        "print(open(f'{work}/sft.jsonl').readline(), open(f'{work}/grpo.jsonl').readline())\n"
        "COMMON = ['model.preset=v3-tiny', 'model.vocab_size=259', "
        "'model.num_hidden_layers=2',\n"
        "          'model.num_nextn_predict_layers=0', 'model.remat=none', "
        "'data.tokenizer=null',\n"
        "          'data.seq_len=32', 'mesh.rules=dp', 'train.schedule=constant', "
        "'train.warmup_steps=0',\n"
        "          'train.log_every=1', 'train.progress=false', 'train.tensorboard=false',\n"
        "          'checkpoint.every=0', 'checkpoint.async_save=false']\n"
        "SFT_STEPS, GRPO_STEPS = (150, 24) if SMALL else (150, 48)",
    ),
    (
        "md",
        "## SFT\nThe loss covers the reply tokens only (the prompt is masked), dialogues are "
        "packed with segment ids. The answer digit is noisy, so the loss stops near its "
        "entropy (~0.65 nats per reply token) instead of going to 0.",
    ),
    (
        "code",
        "sft_dir = f'{work}/sft'\n"
        "run(load_run_config(None, COMMON + [\n"
        "    'train.task=sft', f'post.data={work}/sft.jsonl', 'data.global_batch_size=16',\n"
        "    f'train.steps={SFT_STEPS}', 'train.lr=3e-3', f'train.run_dir={sft_dir}']))\n"
        "sft = report.read_metrics(sft_dir)\n"
        "sft_steps, sft_loss = report.series(sft, 'main_loss')\n"
        "print(f'SFT loss {sft_loss[0]:.2f} -> {sft_loss[-10:].mean():.2f}')\n"
        "assert sft_loss[0] > 4.0 and sft_loss[-10:].mean() < 1.0  # from ~log(259)",
    ),
    (
        "md",
        "## GRPO from the SFT run\nEach rollout step samples 8 answers for each of the 8 "
        "prompts (`post.group_size=8`, 64 completions), scores them, and normalises the "
        "rewards within each group into advantages; `post.mu=2` takes two clipped policy "
        "updates per rollout batch (the second with ratios != 1), with a KL penalty "
        "(`post.beta`) to the SFT model as reference.",
    ),
    (
        "code",
        "grpo_dir = f'{work}/grpo'\n"
        "run(load_run_config(None, COMMON + [\n"
        "    'train.task=grpo', f'post.data={work}/grpo.jsonl', f'train.init_from={sft_dir}',\n"
        "    'data.global_batch_size=64', 'post.group_size=8', 'post.max_new_tokens=3',\n"
        "    'post.beta=0.04', 'post.mu=2', f'train.steps={GRPO_STEPS}', 'train.lr=3e-3',\n"
        "    f'train.run_dir={grpo_dir}']))\n"
        "grpo = report.read_metrics(grpo_dir)\n"
        "g_steps, reward = report.series(grpo, 'reward/accuracy_mean')\n"
        "_, kl = report.series(grpo, 'kl')\n"
        "print('accuracy reward per step:', np.round(reward, 2))",
    ),
    ("md", "## The curves (from each run's metrics.jsonl)"),
    (
        "code",
        "plt = report.pyplot()\n"
        "fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.5))\n"
        "ax1.plot(sft_steps, sft_loss); ax1.set_yscale('log')\n"
        "ax1.set_title('SFT: reply-token loss'); ax1.set_xlabel('step')\n"
        "ax2.plot(g_steps, reward, marker='o', label='mean accuracy reward')\n"
        "ax2.set_ylim(0, 1); ax2.set_title('GRPO: reward'); ax2.set_xlabel('step'); "
        "ax2.legend()\n"
        "ax3.plot(g_steps, kl); ax3.set_title('GRPO: KL to the SFT model'); "
        "ax3.set_xlabel('step')\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "quarter = len(reward) // 4\n"
        "start, end = reward[:quarter].mean(), reward[-quarter:].mean()\n"
        "print(f'reward: first quarter {start:.2f}, last quarter {end:.2f}')\n"
        "assert 0.15 < start < 0.7  # the SFT-ed model is right some of the time...\n"
        "assert end > start + 0.2  # ...and GRPO makes it right more often",
    ),
]

# ---------------------------------------------------------------------------------- 07 scale
