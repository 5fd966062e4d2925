"""Writes notebooks/ (rerun after changing their cells; the test suite executes them)."""

import nbformat as nbf

CELLS_TOUR = [
    (
        "md",
        "# deepseek-jax: a tour of the model\n\nRuns on a laptop CPU (or a Colab runtime). In "
        "Colab, first run `!pip install -q git+<this repo>`.",
    ),
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
        "for name in ['deepseek-v3-671b', 'deepseek-v2-236b', 'deepseek-v2-lite-16b']:\n"
        "    c = dj.count_params(dj.load_preset(name))\n"
        "    print(f'{name:22s} total {c.total/1e9:7.1f}B  activated {c.activated/1e9:5.1f}B'"
        "  f'  (+MTP {c.mtp/1e9:.1f}B)')",
    ),
    ("md", "## A tiny V3: MLA + group-limited sigmoid MoE + MTP"),
    (
        "code",
        "cfg = dj.load_preset('v3-tiny')\nmodel = dj.DeepSeekModel(cfg, rngs=nnx.Rngs(0))\n"
        "ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)\n"
        "out = model(ids)\nprint(out.logits.shape, out.mtp_logits.shape)\n"
        "print('tokens per expert, layer 0:', out.moe_stats.expert_counts[0].sum(0))",
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
]


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
    nbf.write(nb, path)


if __name__ == "__main__":
    write("notebooks/01_model_tour.ipynb", CELLS_TOUR)
