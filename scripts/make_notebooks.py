"""Writes notebooks/ (rerun after changing their cells; the test suite executes them).

    python scripts/make_notebooks.py

Every notebook starts with an install cell that does nothing where `deepseek_jax` already
imports (a checkout with `pip install -e ".[plot]"`, CI) and otherwise, e.g. on a fresh Colab
runtime, installs the package with its `plot` extra from the repository: the URL is
`[project.urls] Repository` of pyproject.toml (else this checkout's `origin` remote), and the
environment variable DEEPSEEK_JAX_REPO overrides it. Each notebook reads DEEPSEEK_JAX_NB_SMALL=1
(set by tests/test_notebooks.py) to run at a reduced size; the default is the full size (at most
~10 minutes on a CPU runtime).
"""

from __future__ import annotations

import pathlib
import subprocess
import tomllib

import nbformat as nbf

ROOT = pathlib.Path(__file__).resolve().parent.parent


def repository_url() -> str:
    """The repository's https URL: pyproject's [project.urls] Repository, else git's origin."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    url = meta.get("urls", {}).get("Repository", "")
    if not url:
        try:
            url = subprocess.run(
                ["git", "-C", str(ROOT), "remote", "get-url", "origin"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            url = ""
    if url.startswith("git@github.com:"):
        url = "https://github.com/" + url.removeprefix("git@github.com:")
    return url.removesuffix(".git")


INSTALL = """# Install (Colab or any fresh runtime); skipped where deepseek_jax already imports.
import importlib.util, os

REPO = os.environ.get("DEEPSEEK_JAX_REPO", "{url}")
if importlib.util.find_spec("deepseek_jax") is None:
    if not REPO:
        raise RuntimeError(
            "set DEEPSEEK_JAX_REPO to this repository's git URL (https://github.com/OWNER/NAME)"
        )
    %pip install -q "deepseek-jax[plot] @ git+{{REPO}}"
elif importlib.util.find_spec("matplotlib") is None:
    %pip install -q matplotlib
SMALL = os.environ.get("DEEPSEEK_JAX_NB_SMALL") == "1"  # the test suite's reduced size
print("reduced size (CI)" if SMALL else "full size")"""


def install_cell() -> tuple[str, str]:
    return ("code", INSTALL.format(url=repository_url()))


# ------------------------------------------------------------------------------ 01 model tour

CELLS_TOUR = [
    (
        "md",
        "# deepseek-jax: a tour of the model\n\nConfigs at zero memory, MLA's latent cache, "
        "DeepSeekMoE routing and the pipeline schedules. Runs on a laptop CPU or a free Colab "
        "runtime in about a minute.",
    ),
    install_cell(),
    (
        "code",
        "import jax, jax.numpy as jnp\nfrom flax import nnx\nimport deepseek_jax as dj\n"
        "print(jax.__version__, jax.devices())",
    ),
    (
        "md",
        "## Full-size configs at zero memory\n`count_params` builds the real module tree with "
        "`nnx.eval_shape`: nothing is allocated.",
    ),
    (
        "code",
        "counts = {}\n"
        "for name in ['deepseek-v3-671b', 'deepseek-v2-236b', 'deepseek-v2-lite-16b']:\n"
        "    c = counts[name] = dj.count_params(dj.load_preset(name))\n"
        "    print(f'{name:22s} total {c.total/1e9:7.1f}B  activated {c.activated/1e9:5.1f}B'"
        "  f'  (+MTP {c.mtp/1e9:.1f}B)')\n"
        "assert round(counts['deepseek-v3-671b'].total / 1e9) == 671  # the V3 report's 671B\n"
        "assert round(counts['deepseek-v3-671b'].activated / 1e9) == 38  # 37.6B with embeddings",
    ),
    ("md", "## A tiny V3: MLA + group-limited sigmoid MoE + MTP"),
    (
        "code",
        "cfg = dj.load_preset('v3-tiny')\nmodel = dj.DeepSeekModel(cfg, rngs=nnx.Rngs(0))\n"
        "ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)\n"
        "out = model(ids)\nprint(out.logits.shape, out.mtp_logits.shape)\n"
        "per_expert = out.moe_stats.expert_counts[0].sum(0)\n"
        "print('tokens per expert, layer 0:', per_expert)\n"
        "assert int(per_expert.sum()) == 2 * 16 * cfg.num_experts_per_tok  # K experts per token",
    ),
    (
        "md",
        "## The latent KV cache\nDecoding caches only `[c_kv ; k_rope]` per token and folds "
        "W_UK into the query; it reproduces the training path's logits.",
    ),
    (
        "code",
        "caches = model.init_cache(batch=2, max_len=16)\n"
        "pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))\n"
        "logits, caches = model.decode(ids[:, :8], caches, pos[:, :8])\n"
        "err = [float(jnp.abs(logits - out.logits[:, :8]).max())]\n"
        "for t in range(8, 16):\n"
        "    step, caches = model.decode(ids[:, t:t+1], caches, pos[:, t:t+1])\n"
        "    err.append(float(jnp.abs(step[:, 0] - out.logits[:, t]).max()))\n"
        "print('max |absorbed - naive| =', max(err))\nassert max(err) < 1e-4",
    ),
    ("md", "## Pipeline schedules: the V3 report's bubble table, simulated"),
    (
        "code",
        "from deepseek_jax.sharding.schedules import one_f_one_b_schedule, zb1p_schedule, "
        "dualpipe_schedule\nfrom deepseek_jax.sharding.pipeline_sim import Costs, simulate\n"
        "costs = Costs(f=1.0, b=2.0, w=1.0, fb=3.0)\n"
        "for pp in (4, 8):\n"
        "    for name, build in [('1F1B', one_f_one_b_schedule), ('ZB1P', zb1p_schedule), "
        "('DualPipe', dualpipe_schedule)]:\n"
        "        r = simulate(build(pp, 4 * pp), costs)\n"
        "        print(f'PP={pp:2d} {name:9s} bubble={max(r.bubble):5.1f} "
        "peak activations={max(r.peak_activations)}')",
    ),
    (
        "md",
        "More: `02_checkpoints` (hub and Orbax checkpoints), `03_pretraining` (a run and its "
        "plots), `04_generation` (sampling and the caches), `07_scale` (meshes, the 671B plan, "
        "pipeline timelines).",
    ),
]

# ----------------------------------------------------------------------------- 02 checkpoints

CELLS_CHECKPOINTS = [
    (
        "md",
        "# Checkpoints: hub safetensors (BF16 and FP8) and Orbax, at toy size\n\n"
        "What a user does with a real DeepSeek checkpoint, on a tiny V3: write it in the hub "
        "layout (config.json + safetensors, BF16, and DeepSeek's block-FP8 with "
        "`weight_scale_inv`), load it with `load_pretrained`, convert to Orbax and back, and "
        "compare logits. The same commands run on the 671B checkpoint "
        "(`deepseek-jax convert hf-to-orbax HF_DIR ORBAX_DIR`).",
    ),
    install_cell(),
    (
        "code",
        "import json, os, tempfile\nimport jax, jax.numpy as jnp, numpy as np\n"
        "import orbax.checkpoint as ocp\nfrom flax import nnx\nimport deepseek_jax as dj\n"
        "from deepseek_jax.convert import hf_to_orbax, orbax_to_hf\n"
        "from deepseek_jax.hf.safetensors_io import HubCheckpoint\n"
        "work = tempfile.mkdtemp(prefix='dj-ckpt-')\n"
        "# Toy size at either size: with random weights every router score is close to the "
        "others,\n"
        "# and on a bigger model rounding the weights flips top-k choices (large logit jumps).\n"
        "cfg = dj.load_preset('v3-tiny')\n"
        "model = dj.DeepSeekModel(cfg, rngs=nnx.Rngs(0))\n"
        "ids = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)\n"
        "logits = nnx.jit(lambda m, x: m(x).logits)  # compiled once per model structure\n"
        "reference = np.asarray(logits(model, ids))\n"
        "print(dj.count_params(cfg).total / 1e6, 'M parameters; logits', reference.shape)",
    ),
    (
        "md",
        "## Write the hub layout\nThe model state saved by Orbax is exported with "
        "`orbax_to_hf`: once as BF16, once with the decoder's linear weights quantized to "
        "block FP8 (16x16 blocks here so that toy matrices have several; DeepSeek uses "
        "128x128).",
    ),
    (
        "code",
        "state_dir = os.path.join(work, 'state')\nckptr = ocp.StandardCheckpointer()\n"
        "ckptr.save(state_dir, nnx.to_pure_dict(nnx.state(model)))\nckptr.wait_until_finished()\n"
        "hub16 = orbax_to_hf(state_dir, os.path.join(work, 'hub-bf16'), dtype='bfloat16', "
        "config=cfg, progress=False)\n"
        "hub8 = orbax_to_hf(state_dir, os.path.join(work, 'hub-fp8'), fp8=True, "
        "fp8_block=(16, 16), config=cfg, progress=False)\n"
        "for d in (hub16, hub8):\n"
        "    print(os.path.basename(d), sorted(os.listdir(d)))\n"
        "h8 = HubCheckpoint(hub8)\n"
        "name = 'model.layers.1.mlp.experts.0.down_proj.weight'\n"
        "print(name, h8[name].dtype, h8[name].shape, '+ scale', h8[name + '_scale_inv'].shape)\n"
        "assert h8[name].dtype == 'F8_E4M3' and h8[name + '_scale_inv'].dtype == 'F32'\n"
        "print(json.load(open(os.path.join(hub8, 'config.json')))['quantization_config'])",
    ),
    ("md", "## Load them back and compare logits"),
    (
        "code",
        "def max_err(m):\n"
        "    return float(np.abs(np.asarray(logits(m, ids)) - reference).max())\n"
        "scale = float(np.abs(reference).max())\n"
        "err16 = max_err(dj.load_pretrained(hub16))  # bf16 weights, fp32 compute\n"
        "err8 = max_err(dj.load_pretrained(hub8))  # FP8 dequantized on load\n"
        "err8_served = max_err(dj.load_pretrained(hub8, weights='fp8'))  # kept in FP8\n"
        "print(f'max |logit| {scale:.3f}; max error: bf16 {err16:.4f}, fp8 {err8:.4f}, '\n"
        "      f'fp8 served {err8_served:.4f}')\n"
        "assert 0 < err16 < 0.02 * scale  # bf16 rounding of the weights\n"
        "assert err16 < err8 < 0.1 * scale  # 3 mantissa bits: larger, still small\n"
        "assert abs(err8_served - err8) < 0.05 * scale",
    ),
    (
        "md",
        "## Hub -> Orbax -> hub\n`hf_to_orbax` streams tensor by tensor into zarr arrays "
        "(restorable with plain Orbax), and the round trip back to the hub layout is bit-exact.",
    ),
    (
        "code",
        "orb = hf_to_orbax(hub16, os.path.join(work, 'orbax'), progress=False)\n"
        "print(sorted(os.listdir(orb))[:6], '...')\n"
        "from_orbax = np.asarray(logits(dj.load_pretrained(orb), ids))\n"
        "from_hub = np.asarray(logits(dj.load_pretrained(hub16), ids))\n"
        "assert np.array_equal(from_orbax, from_hub)  # the same weights, the same logits\n"
        "back = orbax_to_hf(orb, os.path.join(work, 'hub-again'), progress=False)\n"
        "a, b = HubCheckpoint(hub16), HubCheckpoint(back)\n"
        "names = sorted(a.tensors)\nassert names == sorted(b.tensors)\n"
        "same = all(np.array_equal(a.read(n), b.read(n)) for n in names)\n"
        "print(len(names), 'tensors, bit-exact round trip:', same)\nassert same",
    ),
]

# ---------------------------------------------------------------------------- 03 pre-training

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

CELLS_GENERATION = [
    (
        "md",
        "# Generation over the latent cache\n\nTrain a model briefly, sample from it with "
        "streaming, then compare the cache sizes of MLA (the latent `c_kv` + the shared rope "
        "key) and of a full K/V cache at V3's size, and check the 8-bit latent cache against "
        "the bf16 one.",
    ),
    install_cell(),
    (
        "code",
        "import os, tempfile, time\nimport jax, jax.numpy as jnp, numpy as np\n"
        "from IPython.display import display\nimport deepseek_jax as dj\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.inference.cli import load_run\n"
        "from deepseek_jax.train.config import load_run_config\n"
        "from deepseek_jax.train.loop import run\n"
        "run_dir = os.path.join(tempfile.mkdtemp(prefix='dj-gen-'), 'run')\n"
        "overrides = [f'train.run_dir={run_dir}', 'train.progress=false', "
        "'train.tensorboard=false',\n"
        "             'checkpoint.every=0']\n"
        "if SMALL:\n"
        "    overrides += ['model.preset=v3-tiny', 'model.num_hidden_layers=2', "
        "'model.vocab_size=2048',\n"
        "                  'data.seq_len=64', 'train.steps=20', 'train.warmup_steps=2', "
        "'train.log_every=10']\n"
        "else:\n"
        "    overrides += ['train.steps=120', 'train.warmup_steps=12', 'train.log_every=20']\n"
        "summary = run(load_run_config(None, overrides))\n"
        "model, tokenizer, step = load_run(run_dir)  # newest checkpoint, the run's tokenizer\n"
        "print('restored step', step, 'loss', round(summary['last_loss'], 3))",
    ),
    (
        "md",
        "## Streaming\n`generate_stream` yields each row's new tokens every `chunk_size` decode "
        "steps; concatenated, they are exactly what `generate` returns.",
    ),
    (
        "code",
        "prompts = ['The history of', 'def main(']\n"
        "ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]\n"
        "kw = dict(max_new_tokens=24 if SMALL else 48, temperature=0.8, top_p=0.95, seed=0)\n"
        "streamed = {i: [] for i in range(len(ids))}\n"
        "for chunk in dj.generate_stream(model, ids, chunk_size=8, **kw):\n"
        "    streamed[chunk.index] += list(chunk.tokens)\n"
        "    print(f'[row {chunk.index}] +{len(chunk.tokens)}:', "
        "repr(tokenizer.decode(chunk.tokens)))\n"
        "res = dj.generate(model, ids, **kw)\n"
        "for p, toks in zip(prompts, res.tokens):\n"
        "    print(repr(p + tokenizer.decode(toks)))\n"
        "assert [streamed[i] for i in range(len(ids))] == [list(t) for t in res.tokens]",
    ),
    (
        "md",
        "## Cache bytes per token: latent vs full K/V\nMLA caches `kv_lora_rank + "
        "qk_rope_head_dim` = 512 + 64 values per token and layer (DeepSeek-V2 Sec. 2.1); "
        "multi-head attention with the same heads would cache K (128 heads x 192) and V (128 "
        "x 128). Shapes come from `jax.eval_shape` of the cache constructor at V3's config, "
        "so nothing is allocated.",
    ),
    (
        "code",
        "from deepseek_jax.mla import init_cache\n"
        "v3 = dj.load_preset('deepseek-v3-671b')\nL = v3.num_hidden_layers\n"
        "def cache_bytes(dtype, tokens=1024):\n"
        "    shapes = jax.eval_shape(lambda: init_cache(v3, 1, tokens, dtype))  # one layer\n"
        "    return L * sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes)) / tokens\n"
        "latent16, latent8 = cache_bytes(jnp.bfloat16), cache_bytes(jnp.int8)\n"
        "full16 = L * v3.num_attention_heads * (v3.qk_nope_head_dim + v3.qk_rope_head_dim + "
        "v3.v_head_dim) * 2\n"
        "print(f'bytes per token: latent bf16 {latent16:,.0f}, latent int8 {latent8:,.0f}, '\n"
        "      f'full K/V bf16 {full16:,.0f} ({full16 / latent16:.0f}x the latent)')\n"
        "assert latent16 == L * (512 + 64) * 2  # V2 Sec. 2.1: (d_c + d_h^R) l elements\n"
        "assert latent8 == L * ((512 + 64) + 2 * 4)  # 8-bit values + two fp32 scales per token\n"
        "lengths = [2**k for k in range(10, 18)]  # 1K .. 128K tokens\n"
        "plt = report.pyplot()\nfig, ax = plt.subplots(figsize=(7, 4))\n"
        "report.plot_cache_bytes(ax, lengths, {\n"
        "    'full K/V (bf16)': [full16 * n for n in lengths],\n"
        "    'MLA latent (bf16)': [latent16 * n for n in lengths],\n"
        "    'MLA latent (int8)': [latent8 * n for n in lengths]})\n"
        "ax.set_title('DeepSeek-V3 cache per sequence (61 layers)')\n"
        "display(fig); plt.close(fig)",
    ),
    (
        "md",
        "## The 8-bit latent cache's accuracy\nTeacher-forced decoding of the same tokens with "
        "a float32, a bf16 and an int8 cache (per-token scales); errors are against the "
        "float32 cache.",
    ),
    (
        "code",
        "seq = jnp.asarray([ids[0] + list(res.tokens[0])], jnp.int32)\nT = seq.shape[1]\n"
        "pos = jnp.arange(T, dtype=jnp.int32)[None]\n"
        "from flax import nnx\n"
        "decode = nnx.jit(lambda m, x, c, p: m.decode(x, c, p))\n"
        "def decode_logits(dtype):\n"
        "    caches = model.init_cache(1, T, dtype)\n"
        "    out = []\n"
        "    for t in range(T):  # one token at a time through the cache: one compiled step\n"
        "        step, caches = decode(model, seq[:, t:t+1], caches, pos[:, t:t+1])\n"
        "        out.append(step)\n"
        "    return np.asarray(jnp.concatenate(out, axis=1)[0])\n"
        "ref = decode_logits(jnp.float32)\n"
        "rows = {}\n"
        "for name, dt in [('bf16', jnp.bfloat16), ('int8', jnp.int8)]:\n"
        "    got = decode_logits(dt)\n"
        "    err = np.abs(got - ref).max() / np.abs(ref).max()\n"
        "    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()\n"
        "    rows[name] = (err, top1)\n"
        "    print(f'{name}: max |logit error| / max |logit| = {err:.2e}, '\n"
        "          f'top-1 agreement {top1:.1%}')\n"
        "assert rows['int8'][0] < 0.05 and rows['int8'][1] >= 0.9\n"
        "assert rows['bf16'][0] < 0.05",
    ),
]

# ------------------------------------------------------------------------- 05 speculative

CELLS_SPECULATIVE = [
    (
        "md",
        "# MTP speculative decoding\n\nV3's multi-token-prediction modules (V3 Sec. 2.2) "
        "double as a draft model: `generate(..., draft='mtp', num_draft_tokens=k)` drafts k "
        "tokens with them, verifies them in one forward of the main model over its latent "
        "cache, and keeps the longest accepted prefix plus one token "
        "(deepseek_jax/inference/speculative.py). Greedy output is identical to plain greedy "
        "decoding; sampled output has exactly the target's distribution. This notebook checks "
        "both and measures acceptance and speed.",
    ),
    install_cell(),
    (
        "md",
        "## A model whose drafts are sometimes right\nA randomly initialised MTP module almost "
        "never guesses the main model's next token, so nothing would be accepted. As in "
        "tests/inference/test_speculative.py, the tiny V3's MTP module is made to nearly copy "
        "the main model's hidden state (a dominant identity block in `eh_proj`), so its draft "
        "is the main model's prediction one position early: right when the continuation "
        "repeats, wrong otherwise. (bench/bench_speculative.py measures a trained V3 with an "
        "MTP-only trained module; its numbers are in docs/benchmarks.md.)",
    ),
    (
        "code",
        "if SMALL:  # CI: one CPU device, unoptimised XLA code generation (compiling dominates)\n"
        "    os.environ['XLA_FLAGS'] = '--xla_backend_optimization_level=0'\n"
        "import time\nimport jax, jax.numpy as jnp, numpy as np\nfrom flax import nnx\n"
        "from IPython.display import display\nimport deepseek_jax as dj\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.inference.speculative import speculative_accept\n"
        "cfg = dj.load_preset('v3-tiny').replace(num_nextn_predict_layers=1)\n"
        "model = dj.DeepSeekModel(cfg, rngs=nnx.Rngs(1))\n"
        "model.lm_head[...] = model.lm_head[...] * 20.0  # O(1) logits: clear argmaxes\n"
        "D = cfg.hidden_size\n"
        "w = model.mtp.eh_proj[...]  # [modules, 2D, D]: [Emb(t); h] -> D\n"
        "model.mtp.eh_proj[...] = w.at[:, D:, :].add(30.0 * jnp.eye(D)[None])\n"
        "rng = np.random.default_rng(0)\n"
        "B, NEW = (4, 24) if SMALL else (8, 96)\n"
        "prompts = [list(rng.integers(0, cfg.vocab_size, int(n))) for n in "
        "rng.integers(3, 16, B)]\n"
        "print(cfg.num_hidden_layers, 'layers,', cfg.num_nextn_predict_layers, 'MTP module;', "
        "B, 'prompts,', NEW, 'new tokens each')",
    ),
    (
        "md",
        "## Greedy: the same tokens as plain decoding\nDraft depths beyond the number of MTP "
        "modules reuse the last module one position further on. Each variant is compiled "
        "once, then timed over three interleaved rounds (the fastest kept, as in "
        "bench/bench_speculative.py).",
    ),
    (
        "code",
        "KS = (2,) if SMALL else (1, 2, 3)  # k = 2 > 1 module: the module reused at depth 2\n"
        "variants = {'plain': {}} | {f'k={k}': dict(draft='mtp', num_draft_tokens=k) "
        "for k in KS}\n"
        "for kw in variants.values():\n"
        "    dj.generate(model, prompts, max_new_tokens=NEW, **kw)  # compile\n"
        "res = {}\n"
        "for _ in range(3):  # interleaved rounds, each variant keeps its fastest decode\n"
        "    for name, kw in variants.items():\n"
        "        r = dj.generate(model, prompts, max_new_tokens=NEW, **kw)\n"
        "        if name not in res or r.stats['decode_s'] < res[name].stats['decode_s']:\n"
        "            res[name] = r\n"
        "plain = res['plain']\n"
        "for name, r in res.items():\n"
        "    line = f\"{name:6s} decode {r.stats['decode_tokens_per_s']:8.1f} tok/s\"\n"
        "    if name != 'plain':\n"
        "        s = r.stats['speculative']\n"
        "        per = ' / '.join(f'{a:.2f}' for a in s['acceptance_per_position'])\n"
        '        line += (f"  acceptance per position {per}, tokens per verify step "\n'
        "                 f\"{s['mean_accepted_length']:.2f}\")\n"
        "        assert r.tokens == plain.tokens  # greedy speculative == greedy\n"
        "        assert 0 < s['accepted_tokens'] < s['drafted_tokens']  # accepts and rejects\n"
        "    print(line)\n"
        "print('every speculative output equals plain greedy decoding')",
    ),
    (
        "md",
        "Acceptance per draft position (the share of verify steps that reached position i "
        "and accepted its draft) and decode throughput relative to plain decoding. On a CPU "
        "a tiny model's verify forward costs about as much as a decode step, so the speed-up "
        "follows the tokens per verify step minus the drafting cost; measured, not asserted.",
    ),
    (
        "code",
        "plt = report.pyplot()\n"
        "fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))\n"
        "width = 0.8 / len(KS)\n"
        "for j, k in enumerate(KS):\n"
        "    acc = res[f'k={k}'].stats['speculative']['acceptance_per_position']\n"
        "    ax1.bar(np.arange(1, k + 1) + (j - (len(KS) - 1) / 2) * width, acc, width, "
        "label=f'k={k}')\n"
        "ax1.set_xlabel('draft position'); ax1.set_ylabel('acceptance'); ax1.set_ylim(0, 1)\n"
        "ax1.set_xticks(range(1, max(KS) + 1)); ax1.legend(); "
        "ax1.set_title('acceptance per draft position')\n"
        "rate0 = plain.stats['decode_tokens_per_s']\n"
        "names = list(res)\n"
        "speed = [res[n].stats['decode_tokens_per_s'] / rate0 for n in names]\n"
        "ax2.bar(names, speed, color=['gray'] + ['C0'] * len(KS))\n"
        "ax2.axhline(1.0, color='k', lw=0.8)\n"
        "ax2.set_ylabel('decode tok/s vs plain'); ax2.set_title('speed-up (greedy, batch '"
        " + str(B) + ')')\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "print({n: round(s, 2) for n, s in zip(names, speed)})",
    ),
    (
        "md",
        "## The accept / resample rule keeps the target distribution\nThe kernel alone on a "
        "6-token vocabulary: drafts d_1, d_2 ~ q_1, q_2 are accepted with probability "
        "min(1, p(d)/q(d)); at the first rejection a token is drawn from "
        "normalize(max(p - q, 0)), and after K accepts a bonus token from p_K. Whatever q is, "
        "the first emitted token must follow p_0 exactly, and the token after an accepted d_1 "
        "must follow p_1 (Leviathan et al. 2023, Theorem 1). Checked by a chi-square test and "
        "the total-variation distance over many independent steps; emitting the drafts "
        "unchecked would follow q instead (TV distance to p printed below).",
    ),
    (
        "code",
        "from scipy import stats\n"
        "V, N = 6, (50_000 if SMALL else 400_000)\n"
        "r = np.random.default_rng(1)\n"
        "p = jnp.asarray(r.dirichlet(np.ones(V) * 0.7, size=3), jnp.float32)  # p_0, p_1, p_2\n"
        "q = jnp.asarray(r.dirichlet(np.ones(V) * 0.7, size=2), jnp.float32)  # q_1, q_2\n"
        "@jax.jit\n"
        "def step(key):  # one speculative step with K = 2: the emitted tokens\n"
        "    kd, ka = jax.random.split(key)\n"
        "    d = jax.random.categorical(kd, jnp.log(q), axis=-1).astype(jnp.int32)\n"
        "    a, y = speculative_accept(p[None], q[None], d[None], ka[None])\n"
        "    return a[0], jnp.where(jnp.arange(3) < a[0], jnp.append(d, 0), y[0])\n"
        "a, emitted = jax.device_get(jax.vmap(step)(jax.random.split(jax.random.key(0), N)))\n"
        "checks = [('first token', emitted[:, 0], p[0]), "
        "('second | d_1 accepted', emitted[a >= 1, 1], p[1])]\n"
        "plt = report.pyplot()\n"
        "fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))\n"
        "for ax, (name, toks, target) in zip(axes, checks):\n"
        "    counts = np.bincount(toks, minlength=V)\n"
        "    freq, target = counts / len(toks), np.asarray(target, np.float64)\n"
        "    target /= target.sum()\n"
        "    tv = 0.5 * np.abs(freq - target).sum()\n"
        "    pval = stats.chisquare(counts, target * len(toks)).pvalue\n"
        "    print(f'{name:22s} n={len(toks):7d}  TV distance {tv:.4f}  chi-square p {pval:.3f}')\n"
        "    # sqrt(V / n) is >= 2.5x the TV distance expected from sampling noise alone\n"
        "    assert pval > 1e-3 and tv < np.sqrt(V / len(toks))  # it follows the target\n"
        "    x = np.arange(V)\n"
        "    ax.bar(x - 0.2, target, 0.4, label='target p'); ax.bar(x + 0.2, freq, 0.4, "
        "label='emitted')\n"
        "    ax.set_title(name); ax.set_xlabel('token'); ax.legend()\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "tv_q = 0.5 * float(jnp.abs(p[0] - q[0]).sum())\n"
        "print(f'TV(p_0, q_1) = {tv_q:.3f}: what emitting drafts unchecked would give')\n"
        "beta = float(jnp.minimum(p[0], q[0]).sum())  # expected acceptance of d_1\n"
        "print(f'acceptance of d_1: {np.mean(a >= 1):.4f}, expected sum min(p, q) = {beta:.4f}')\n"
        "assert abs(np.mean(a >= 1) - beta) < 4 * np.sqrt(beta * (1 - beta) / N)",
    ),
]

# -------------------------------------------------------------------------- 06 post-training

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

CELLS_SCALE = [
    (
        "md",
        "# Scale: meshes, sharding rules, the 671B plan and the pipeline schedules\n\n"
        "Everything here runs on a CPU: eight emulated devices for a real mesh, abstract meshes "
        "of 2048 devices for the plan, and the event simulator for the pipeline timelines.",
    ),
    install_cell(),
    (
        "code",
        "import os\n"
        "# eight emulated CPU devices; set before jax is imported\n"
        "os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')\n"
        "import jax, jax.numpy as jnp, numpy as np\nfrom flax import nnx\n"
        "from IPython.display import display\nimport deepseek_jax as dj\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.sharding.mesh import MeshConfig, make_mesh\n"
        "from deepseek_jax.sharding.rules import RULE_PRESETS, get_rules, param_shardings, "
        "state_specs\n"
        "print(len(jax.devices()), 'devices')",
    ),
    (
        "md",
        "## Mesh axes and rules\nModel code names logical axes only (`embed`, `heads`, "
        "`experts`, ...); one rules table maps them onto the mesh axes `data, fsdp, expert, "
        "tensor, stage`.",
    ),
    (
        "code",
        "for name, table in RULE_PRESETS.items():\n"
        "    print(f'{name:11s}', {k: v for k, v in table.items()})\n"
        "n = len(jax.devices())\n"
        "mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=n // 2, rules='fsdp_ep'))\n"
        "print(dict(mesh.shape))\n"
        "cfg = dj.load_preset('v3-tiny')\n"
        "model = dj.DeepSeekModel(cfg, rngs=nnx.Rngs(0))\n"
        "params = nnx.state(model, nnx.Param)\n"
        "placed = jax.device_put(nnx.to_pure_dict(params), "
        "nnx.to_pure_dict(param_shardings(params, mesh, get_rules('fsdp_ep'))))\n"
        "w = placed['moe_layers']['ffn']['w_gate']  # [L, E, D, F]: experts over `expert`\n"
        "print('w_gate', w.shape, w.sharding.spec, '-> one shard', "
        "w.addressable_shards[0].data.shape)\n"
        "assert w.addressable_shards[0].data.shape[1] == cfg.n_routed_experts // (n // 2)",
    ),
    (
        "md",
        "The same rules on the full V3 (an abstract model: shapes and logical axes only) over "
        "fsdp=8, expert=32, tensor=8:",
    ),
    (
        "code",
        "from jax.sharding import PartitionSpec\n"
        "v3 = dj.load_preset('deepseek-v3-671b')\n"
        "abstract = nnx.eval_shape(lambda: dj.DeepSeekModel(v3, rngs=nnx.Rngs(0)))\n"
        "sizes = dict(data=1, fsdp=8, expert=32, tensor=8, stage=1)\n"
        "params = nnx.state(abstract, nnx.Param)\n"
        "specs = nnx.to_pure_dict(state_specs(params, get_rules('fsdp_ep_tp'), sizes))\n"
        "shapes = nnx.to_pure_dict(params)\n"
        "is_spec = lambda x: isinstance(x, PartitionSpec)\n"
        "flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]\n"
        "shown = 0\n"
        "for path, spec in flat:\n"
        "    name = '.'.join(str(getattr(k, 'key', k)) for k in path)\n"
        "    if any(t in name for t in ('embed', 'wq_b', 'wkv_b', 'w_gate', 'lm_head')):\n"
        "        leaf = shapes\n"
        "        for k in path:\n"
        "            leaf = leaf[getattr(k, 'key', k)]\n"
        "        print(f'{name:32s} {str(leaf.shape):28s} {spec}')\n"
        "        shown += 1\n"
        "assert shown >= 5",
    ),
    (
        "md",
        "## DeepSeek-V3 671B on 2048 devices, without devices\nThe train step is lowered for GPU "
        "on an `AbstractMesh`; memory per device comes from the shardings, collectives from the "
        "traced program (`deepseek-jax plan --config deepseek-v3-671b --mesh ...`).",
    ),
    (
        "code",
        "from deepseek_jax.plan import format_plan, plan\n"
        "meshes = [dict(stage=16, expert=64, fsdp=2)]\n"
        "if not SMALL:\n"
        "    meshes.append(dict(stage=8, expert=64, fsdp=4))\n"
        "plans = [plan(v3, m, 'fsdp_ep', config_name='deepseek-v3-671b') for m in meshes]\n"
        "print(format_plan(plans[0]))\n"
        "GiB = 2**30\n"
        "print(f\"\\n{'mesh':40s} {'params':>8s} {'optim':>8s} {'activ':>8s} \"\n"
        "      f\"{'total GiB':>10s}\")\n"
        "for m, p in zip(meshes, plans):\n"
        "    print(f'{str(m):40s} {p.param_bytes/GiB:8.2f} {p.optimizer_bytes/GiB:8.2f} '\n"
        "          f'{p.activation_bytes/GiB:8.2f} {p.total_bytes/GiB:10.2f}')\n"
        "p = plans[0]\n"
        "assert round(p.params_total / 1e9) == 683 and round(p.params_activated / 1e9) == 38\n"
        "assert p.total_bytes < 80 * GiB  # fits an 80 GB GPU",
    ),
    (
        "md",
        "## Pipeline schedules drawn per rank\nThe event simulator runs the 1F1B, ZB1P and "
        "DualPipe schedules with F = 1, B = 2 (full backward), W = 1, where every formula of the "
        "V3 report's Table 2 holds; an overlapped F&B pair is a split box with a black border.",
    ),
    (
        "code",
        "from deepseek_jax.sharding.pipeline_sim import Costs, report_activations, "
        "report_bubble, simulate\n"
        "from deepseek_jax.sharding.schedules import dualpipe_schedule, one_f_one_b_schedule, "
        "zb1p_schedule\n"
        "costs = Costs(f=1, b=2, w=1)\nPP, N = (4, 8) if SMALL else (8, 20)\n"
        "builders = {'1F1B': one_f_one_b_schedule, 'ZB1P': zb1p_schedule, "
        "'DualPipe': dualpipe_schedule}\n"
        "plt = report.pyplot()\n"
        "fig, axes = plt.subplots(3, 1, figsize=(14, 1.5 + 1.1 * PP))\n"
        "for ax, (name, build) in zip(axes, builders.items()):\n"
        "    r = report.plot_pipeline_timeline(ax, build(PP, N), costs, legend=True)\n"
        "    table2 = report_bubble(name, PP, costs)\n"
        "    print(f'{name:9s} bubble (worst rank) {r.max_bubble:g}  Table 2 {table2:g}  '\n"
        "          f'peak activations {r.max_peak_activations} (Table 2: "
        "{report_activations(name, PP)})')\n"
        "    assert r.max_bubble == table2 and r.max_peak_activations == "
        "report_activations(name, PP)\n"
        "fig.tight_layout(); display(fig); plt.close(fig)",
    ),
]

NOTEBOOKS = {
    "01_model_tour.ipynb": CELLS_TOUR,
    "02_checkpoints.ipynb": CELLS_CHECKPOINTS,
    "03_pretraining.ipynb": CELLS_PRETRAIN,
    "04_generation.ipynb": CELLS_GENERATION,
    "05_speculative.ipynb": CELLS_SPECULATIVE,
    "06_post_training.ipynb": CELLS_POST,
    "07_scale.ipynb": CELLS_SCALE,
}


def write(path, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells
    ]
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating leaves unchanged cells alone
        cell.id = f"cell-{i}"
    nbf.write(nb, path)


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        write(ROOT / "notebooks" / name, cells)
