"""Notebooks 01 (the model tour) and 02 (checkpoints)."""

from __future__ import annotations

from .common import install_cell

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
