"""Notebook 07 (meshes and rules, the 671B plan, pipeline timelines)."""

from __future__ import annotations

from .common import install_cell

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
