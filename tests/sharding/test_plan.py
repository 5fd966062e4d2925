"""The planner: the train step lowered on an abstract mesh, bytes and collective volume."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import load_preset
from deepseek_jax.model import DeepSeekModel
from deepseek_jax.plan import collectives_from_jaxpr, local_bytes, main
from deepseek_jax.sharding.mesh import AXES, abstract_mesh

GiB = 1024**3


@pytest.fixture(scope="module")
def mid():
    return load_preset("v3-1b")  # 1.3B parameters, 64 experts, bf16


def _moe_blocks(cfg):
    return cfg.num_moe_layers + cfg.num_nextn_predict_layers


def test_plan_mid_size_fsdp_ep(mid, capsys):
    seq = 256
    plan = main(
        ["--config", "configs/v3-1b.yaml", "--mesh", "data=2,fsdp=4,expert=8", "--seq", str(seq)]
    )
    out = capsys.readouterr().out
    for row in ("parameters (fp32 master)", "optimizer state", "ragged_all_to_all", "total"):
        assert row in out
    assert plan.mesh == {"data": 2, "fsdp": 4, "expert": 8, "tensor": 1, "stage": 1}
    assert plan.batch == 64  # one sequence per batch shard by default
    # Parameter bytes, independently: routed experts split 8 x 4 (expert x fsdp), the rest 4.
    model = nnx.eval_shape(lambda: DeepSeekModel(mid, rngs=nnx.Rngs(0)))
    expect = 0
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = 32 if "experts" in v.get_metadata()["logical_axes"] else 4
        expect += math.prod(v.shape) * 4 / n
    assert plan.param_bytes == expect
    assert plan.optimizer_bytes >= 2 * plan.param_bytes  # AdamW mu and nu (+ biases, count)
    # Traced EP traffic: each device moves its M_l K rows of D bf16 values in each of the two
    # exchanges, in the forward, the recomputed forward (full remat) and the backward.
    M_l = seq  # one sequence per device
    per_exchange = M_l * mid.num_experts_per_tok * mid.hidden_size * 2
    ragged = plan.collectives["ragged_all_to_all"]
    assert ragged.count == 6 * _moe_blocks(mid)
    assert ragged.operand_bytes == 6 * _moe_blocks(mid) * per_exchange
    assert ragged.wire_bytes == pytest.approx(ragged.operand_bytes * 7 / 8)
    # The FSDP gathers of expert weights happen inside the shard_map (traced, bf16) and their
    # transposes are reduce-scatters.
    assert plan.collectives["reduce_scatter"].count > 0
    assert plan.lower_seconds < 120


def test_dropless_plan_says_how_many_rows_the_dispatch_sends(mid, capsys):
    args = ["--config", "v3-1b", "--mesh", "data=2,fsdp=4,expert=8", "--seq", "256"]
    assert main(args).dispatch_pairs is None  # a bounded buffer: one row per kept assignment
    assert "(token, device) pair" not in capsys.readouterr().out
    plan = main([*args, "--buffer-factor", "0"])
    assert 1 < plan.dispatch_pairs <= mid.topk_group < mid.num_experts_per_tok  # a group each
    K = mid.num_experts_per_tok
    assert f"pair: {plan.dispatch_pairs:.2f} of K = {K} per token" in capsys.readouterr().out


def test_plan_pipeline_stages_and_tensor_parallel(mid, capsys):
    plan = main(
        [
            "--config",
            "configs/v3-1b.yaml",
            "--mesh",
            "stage=4,fsdp=2,expert=4,tensor=2",
            "--rules",
            "fsdp_ep_tp",
            "--exchange",
            "capacity",
            "--seq",
            "256",
        ]
    )
    out = capsys.readouterr().out
    assert "stage=4" in out and "3 of 12 layers" in out
    assert "tensor-parallel all-reduce" in plan.collectives
    assert "pipeline send/recv (per micro-batch)" in plan.collectives
    assert plan.collectives["all_to_all"].count > 0  # the capacity exchange
    assert "ragged_all_to_all" not in plan.collectives


def test_collectives_from_jaxpr_multiplies_scan_trips():
    mesh = abstract_mesh({"expert": 4})

    def body(x):
        def step(c, _):
            return c + jax.lax.psum(c, "expert"), None

        return jax.lax.scan(step, x, None, length=5)[0]

    f = jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
    x = jax.ShapeDtypeStruct((4 * 3,), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
        jaxpr = jax.make_jaxpr(f)(x)
    c = collectives_from_jaxpr(jaxpr, dict(mesh.shape))["all_reduce"]
    assert c.count == 5 and c.operand_bytes == 5 * 3 * 4
    assert c.wire_bytes == pytest.approx(5 * 3 * 4 * 2 * 3 / 4)  # ring all-reduce


def test_local_bytes_divides_by_the_spec_axes():
    sizes = dict.fromkeys(AXES, 1) | {"fsdp": 4, "expert": 8}
    assert (
        local_bytes((64, 1024, 512), jnp.float32, P("expert", "fsdp"), sizes)
        == 64 * 1024 * 512 * 4 // 32
    )
    assert local_bytes((8, 4), jnp.bfloat16, P(("fsdp", "expert")), sizes) == 8 * 4 * 2 // 32
