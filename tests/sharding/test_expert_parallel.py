"""The expert-parallel MoE block: dispatch plans, exchanges, dropping, bytes, node limits.

Eight emulated CPU devices. XLA:CPU cannot run `ragged_all_to_all`, so the dropless path is
proven three ways: its offset/size plan against the capacity path's layout (numpy), its
all-gather emulation run end to end against the single-device reference (forward and
gradients), and the real collective lowered (not compiled) with the same code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.moe import MoE, ep_plan
from deepseek_jax.moe import expert_parallel as ep
from deepseek_jax.moe.router import Routing, route
from deepseek_jax.plan import collectives_from_jaxpr, collectives_from_stablehlo
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.parallel import ONE_DEVICE, ParallelConfig, default_exchange
from deepseek_jax.sharding.rules import get_rules
from deepseek_jax.testing import MODEL_FP32, assert_close

B, T = 8, 6  # 48 tokens, 6 per device on the 8-way batch split


@pytest.fixture(scope="module")
def block():
    cfg = load_preset("v3-tiny")  # E=8, K=2, 4 groups of 2, topk_group=2, fp32
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    # A random selection bias spreads the routing over all experts and groups.
    moe.router.bias[...] = 0.3 * jax.random.normal(jax.random.key(3), (cfg.n_routed_experts,))
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.hidden_size))
    return cfg, moe, x


def _parallel(mesh_cfg, exchange):
    return ParallelConfig(make_mesh(mesh_cfg), get_rules(mesh_cfg.rules), exchange)


def _out_and_grads(moe, x, parallel=ONE_DEVICE):
    """(output, stats, d/dx, d/dweights) of sum(out^2), jitted."""

    def loss(m, x):
        out, stats = m(x, parallel=parallel)
        return (out**2).sum(), (out, stats)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (g_m, g_x), (out, stats) = fn(moe, x)
    return out, stats, g_x, nnx.state(g_m, nnx.Param)


@pytest.fixture(scope="module")
def reference(block):
    cfg, moe, x = block
    return _out_and_grads(moe, x)  # v3-tiny: moe_impl='dropless' on one device


# ---- per-device plans ---------------------------------------------------------------------
def test_capacity_layout_drops_lowest_affinity_per_device():
    # Five assignments (K=1) to device 0 and one to device 1; 2 slots per device.
    dest = jnp.array([[0], [0], [1], [0], [0], [0]])
    w = jnp.array([[0.1], [0.9], [0.3], [0.5], [0.7], [0.2]])
    order, sorted_dest, slot, keep = ep_plan.capacity_layout(dest, w, n_dev=2, capacity=2)
    np.testing.assert_array_equal(np.asarray(keep[:, 0]), [0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(order), [1, 4, 3, 5, 0, 2])  # device, then -w
    np.testing.assert_array_equal(np.asarray(sorted_dest), [0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(slot), [0, 1, 2, 2, 2, 0])  # 2 = dropped


def _simulate_ragged(experts_per_src, E, n_dev, buffer_rows):
    """Runs every device's RaggedPlan through a numpy model of ragged_all_to_all.

    Payload rows are (source, assignment id, expert), so where each row lands can be checked.
    """
    counts = np.stack([np.bincount(e.reshape(-1), minlength=E) for e in experts_per_src])
    plan = jax.jit(ep_plan.ragged_plan, static_argnums=2)
    plans = [plan(jnp.asarray(counts), jnp.int32(me), buffer_rows) for me in range(n_dev)]
    plans = [jax.tree.map(np.asarray, p) for p in plans]
    bufs = [np.full((buffer_rows, 3), -1) for _ in range(n_dev)]
    for q, (e, p) in enumerate(zip(experts_per_src, plans, strict=True)):
        flat = e.reshape(-1)
        order = np.argsort(flat, kind="stable")
        rows = np.stack([np.full_like(order, q), order, flat[order]], 1)  # expert-sorted rows
        for d in range(n_dev):
            n, src, dst = p.send_sizes[d], p.input_offsets[d], p.output_offsets[d]
            assert n == plans[d].recv_sizes[q]  # ragged_all_to_all's size contract
            assert dst == plans[d].recv_offsets[q]
            bufs[d][dst : dst + n] = rows[src : src + n]
    return counts, plans, bufs


@pytest.mark.parametrize("tight", [False, True], ids=["worst_case", "tight"])
def test_ragged_plan_matches_capacity_layout(tight):
    # The plan never clips (the exchange drops before it plans): a buffer of the worst case or
    # of exactly the busiest receiver's arrivals holds every row sent.
    n_dev, E, M, K = 4, 8, 6, 2
    rng = np.random.default_rng(0)
    experts = [np.stack([rng.choice(E, K, replace=False) for _ in range(M)]) for _ in range(n_dev)]
    E_l = E // n_dev
    load = np.bincount(np.concatenate(experts).reshape(-1) // E_l, minlength=n_dev)
    rows = int(load.max()) if tight else n_dev * M * min(K, E_l)
    assert rows < n_dev * M * min(K, E_l) or not tight
    counts, plans, bufs = _simulate_ragged(experts, E, n_dev, rows)
    for d in range(n_dev):
        got = bufs[d][bufs[d][:, 0] >= 0]
        assert len(got) == load[d]
        # Every received row is for one of d's experts, and recv_expert names it.
        assert np.all(got[:, 2] // E_l == d)
        np.testing.assert_array_equal(plans[d].recv_expert[: len(got)], got[:, 2] % E_l)
        assert np.all(plans[d].recv_expert[len(got) :] == E_l)  # empty rows
        for q in range(n_dev):
            # The capacity layout (ample C) puts source q's rows for d in block q of d's
            # receive buffer; the ragged buffer holds the same assignments.
            dest = jnp.asarray(experts[q] // E_l)
            order, sd, slot, keep = ep_plan.capacity_layout(dest, jnp.ones((M, K)), n_dev, M * K)
            cap_rows = set(np.asarray(order)[np.asarray(sd) == d].tolist())
            assert set(got[got[:, 0] == q][:, 1].tolist()) == cap_rows


def test_emulated_ragged_all_to_all_matches_jax_docstring_example():
    # The example of jax.lax.ragged_all_to_all's docstring, on a 2-device axis.
    mesh = jax.make_mesh(
        (2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2]
    )
    args = [
        jnp.array([[1, 2, 2], [3, 4, 0]]),  # operand
        jnp.zeros((2, 4), jnp.int32),  # output
        jnp.array([[0, 1], [0, 1]]),  # input_offsets
        jnp.array([[1, 2], [1, 1]]),  # send_sizes
        jnp.array([[0, 0], [1, 2]]),  # output_offsets
        jnp.array([[1, 1], [2, 1]]),  # recv_sizes
    ]
    P = jax.P("x")
    f = jax.shard_map(
        lambda *a: ep_plan.ragged_all_to_all_emulated(*(v[0] for v in a), axis_name="x")[None],
        mesh=mesh,
        in_specs=(P,) * 6,
        out_specs=P,
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(*args)), [[1, 3, 0, 0], [2, 2, 4, 0]])


# ---- the block under shard_map --------------------------------------------------------------
EP_CASES = [
    ("ragged_emulated", MeshConfig(data=2, fsdp=1, expert=4, rules="ep")),
    ("capacity", MeshConfig(fsdp=2, expert=4, rules="fsdp_ep")),
    # Experts replicated (an EP group of one device): each device's tokens through all experts.
    ("ragged_emulated", MeshConfig(data=8, fsdp=1, rules="dp")),
    ("ragged_emulated", MeshConfig(data=4, fsdp=2, rules="fsdp")),
]


@pytest.mark.parametrize(
    "exchange,mesh_cfg", EP_CASES, ids=[f"{c[0]}-{c[1].rules}" for c in EP_CASES]
)
def test_ep_block_equals_dropless_reference(block, reference, exchange, mesh_cfg):
    cfg, moe, x = block
    if exchange == "capacity":  # C = M_l K cf / P >= M_l min(K, E/P): no device can overflow
        moe = nnx.merge(*nnx.split(moe))
        moe.cfg = cfg.replace(capacity_factor=4.0)
    parallel = _parallel(mesh_cfg, exchange)
    out, stats, g_x, g_w = _out_and_grads(moe, x, parallel)
    ref_out, ref_stats, ref_gx, ref_gw = reference
    assert float(stats.dropped) == 0.0
    assert_close(out, ref_out, **MODEL_FP32)
    assert_close(g_x, ref_gx, **MODEL_FP32)
    jax.tree.map(lambda a, b: assert_close(a, b, **MODEL_FP32), g_w, ref_gw)
    # Per-sequence counts come back whole; their sum is the global (whole-mesh) load.
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), ref_stats.expert_counts)
    np.testing.assert_array_equal(
        np.asarray(ep.global_expert_load(stats.expert_counts, parallel)),
        ref_stats.expert_counts.sum(0),
    )


@pytest.mark.parametrize("rules", ["dp", "fsdp"])
def test_replicated_experts_run_the_single_device_plan_without_a_token_exchange(block, rules):
    """With the experts on every device, a device's tokens never leave it: no all-to-all and
    no gathered tokens, the routed products are the single-device plan's (on CPU the
    block-sparse GEMM, not the ragged_dot that costs E times the routed FLOPs there)."""
    cfg, moe, x = block
    mesh_cfg = MeshConfig(data=4, fsdp=2, rules=rules)
    traced, lowered = _lower_block(moe, x, "ragged_emulated", mesh_cfg, grad=True)
    counts = collectives_from_jaxpr(traced.jaxpr, dict(make_mesh(mesh_cfg).shape))
    assert "all_to_all" not in counts and "ragged_all_to_all" not in counts, counts
    # FSDP gathers weights (their D over fsdp), never the [M, D] token rows.
    gathered = counts["all_gather"].operand_bytes if "all_gather" in counts else 0
    assert gathered == (0 if rules == "dp" else sum(w.size * 4 // 2 for w in _routed_weights(moe)))
    hlo = lowered.as_text(debug_info=True)  # with the named scopes
    if jax.default_backend() == "cpu":
        assert "block_gmm" in hlo and "ragged_dot" not in hlo
    else:
        assert "block_gmm" not in hlo


def _routed_weights(moe):
    """The routed experts' weights and the router's [D, E] matrix (FSDP gathers all four)."""
    return [moe.w_gate[...], moe.w_up[...], moe.w_down[...], moe.router.weight[...]]


def _lower_block(moe, x, exchange, mesh_cfg, grad: bool, buffer_factor=None):
    parallel = ParallelConfig(
        make_mesh(mesh_cfg), get_rules(mesh_cfg.rules), exchange, buffer_factor=buffer_factor
    )

    def loss(m, x):
        return (m(x, parallel=parallel)[0] ** 2).sum()

    fn = jax.jit(
        jax.grad(loss, argnums=(0, 1)) if grad else lambda m, x: m(x, parallel=parallel)[0]
    )
    traced = fn.trace(moe, x)
    return traced, traced.lower()


def test_all_to_all_bytes_match_analytic_count(block):
    cfg, moe, x = block
    mesh_cfg = MeshConfig(data=2, fsdp=1, expert=4, rules="ep")
    P, D = 4, cfg.hidden_size
    M_l = B * T // 8
    sizes = ep_plan.capacity_sizes(M_l, cfg, P)
    send = P * sizes.send_rows * D * 4  # one [P, S, D] fp32 buffer
    ids = P * sizes.send_rows * 4  # its int32 expert ids
    verdicts = P * sizes.send_rows * 4 + P * 4  # fp32 priorities out, int32 keep counts back
    for grad, expect in ((False, 2 * send + ids + verdicts), (True, 4 * send + ids + verdicts)):
        traced, lowered = _lower_block(moe, x, "capacity", mesh_cfg, grad)
        traced_bytes = collectives_from_jaxpr(traced.jaxpr, dict(make_mesh(mesh_cfg).shape))
        hlo_bytes = collectives_from_stablehlo(lowered.as_text())
        assert traced_bytes["all_to_all"].operand_bytes == expect
        assert hlo_bytes["all_to_all"].operand_bytes == expect
        assert traced_bytes["all_to_all"].wire_bytes == expect * (P - 1) / P


def test_token_device_pairs_group_each_tokens_assignments_by_device():
    rng = np.random.default_rng(0)
    M, K, E, E_l = 64, 4, 16, 4  # J = 4: a token may have all its experts on one device
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(M)])
    weights = rng.random((M, K)).astype(np.float32)
    r = Routing(jnp.asarray(weights), jnp.asarray(experts, jnp.int32), jnp.zeros((M, E)))
    first, ids, w = (np.asarray(a) for a in ep.token_device_pairs(r, E_l))
    for m in range(M):
        for k in range(K):
            same = [q for q in range(K) if experts[m, q] // E_l == experts[m, k] // E_l]
            assert first[m, k] == (same[0] == k)
            if first[m, k]:  # the pair's row: its experts there in order of k, then none
                want = [experts[m, q] % E_l for q in same] + [E_l] * (K - len(same))
                np.testing.assert_array_equal(ids[m, k], want)
                np.testing.assert_allclose(w[m, k], [*weights[m, same], *[0] * (K - len(same))])
    pairs = {(m, experts[m, k] // E_l) for m in range(M) for k in range(K)}
    assert first.sum() == len(pairs) < M * K


def test_mean_device_pairs_spans_one_row_to_k_rows_per_token():
    cfg = load_preset("v3-1b")  # 64 experts, 6 per token, 8 groups of which 4 are kept
    K = cfg.num_experts_per_tok
    assert ep.mean_device_pairs(cfg, 1, tokens=512) == 1.0  # all experts on one device
    assert ep.mean_device_pairs(cfg, 64, tokens=512) == K  # one expert per device
    # one device per group: a token reaches at most its topk_group kept groups
    assert 1 < ep.mean_device_pairs(cfg, cfg.n_group, tokens=512) <= cfg.topk_group < K


def _spread_routing(moe):
    """`moe` with a router weight of unit-scale logits: the choice depends on the token (the
    small initial weight leaves it to the selection bias, the same experts for every token)."""
    w = moe.router.weight
    w[...] = jax.random.normal(jax.random.key(5), w.shape) / np.sqrt(w.shape[0])
    return moe


def test_dropless_ragged_exchange_sends_each_token_once_per_device(block, monkeypatch):
    """The rows dispatched are the distinct (token, device) pairs, not the M K assignments."""
    cfg, moe, x = block
    moe = _spread_routing(nnx.merge(*nnx.split(moe)))  # some tokens' experts share a device
    mesh_cfg = MeshConfig(data=4, fsdp=1, expert=2, rules="ep")  # 4 experts per device
    sent = []

    def recording(operand, output, input_offsets, send_sizes, *rest, axis_name):
        if operand.dtype == x.dtype and operand.shape[-1] == cfg.hidden_size:  # token rows
            jax.debug.callback(lambda n: sent.append(int(n)), send_sizes.sum())
        return ep_plan.ragged_all_to_all_emulated(
            operand, output, input_offsets, send_sizes, *rest, axis_name=axis_name
        )

    monkeypatch.setattr(ep, "ragged_all_to_all_emulated", recording)
    out, stats, g_x, g_w = _out_and_grads(moe, x, _parallel(mesh_cfg, "ragged_emulated"))
    # A token's experts on one device come back as one weighted sum: forward and gradients
    # (the gating weights' included, through the router) as on one device.
    ref_out, _, ref_gx, ref_gw = _out_and_grads(moe, x)
    assert_close(out, ref_out, **MODEL_FP32)
    assert_close(g_x, ref_gx, **MODEL_FP32)
    jax.tree.map(lambda a, b: assert_close(a, b, **MODEL_FP32), g_w, ref_gw)
    experts = np.asarray(moe.router(x.reshape(-1, cfg.hidden_size)).experts)
    E_l = cfg.n_routed_experts // 2
    pairs = len({(m, e // E_l) for m, row in enumerate(experts) for e in row})
    assert len(experts) < pairs < experts.size  # some tokens on one device, some on two
    # each device's dispatch, then its combine (the same number of rows back)
    assert len(sent) == 16 and sum(sent) == 2 * pairs, (sent, pairs)


def test_ep_block_runs_the_fp8_recipe(block):
    """model.fp8 under expert parallelism: the pair exchange's experts run the grouped FP8
    kernels (one device: the block-sparse FP8 tiles), so the two agree to FP8 and BF16
    rounding, not bit for bit; a lost or doubled block scale is off by 100% or more."""
    cfg = load_preset("v3-tiny").replace(
        dtype="bfloat16", fp8=True, hidden_size=128, moe_intermediate_size=128
    )
    moe = _spread_routing(MoE(cfg, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (8, 16, cfg.hidden_size))
    mesh_cfg = MeshConfig(data=4, fsdp=1, expert=2, rules="ep")
    out, _, g_x, g_w = _out_and_grads(moe, x, _parallel(mesh_cfg, "ragged_emulated"))
    ref_out, _, ref_gx, ref_gw = _out_and_grads(moe, x)

    def rel(a, b):  # largest difference over the largest value
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return np.abs(a - b).max() / np.abs(b).max()

    assert rel(out, ref_out) < 0.01 and rel(g_x, ref_gx) < 0.05  # measured 0.3%, 2.2%
    for name in ("w_gate", "w_up", "w_down"):
        assert rel(g_w[name][...], ref_gw[name][...]) < 0.1, name  # measured <= 5%


def test_ragged_path_lowers_with_ragged_all_to_all(block):
    # XLA:CPU cannot compile ragged-all-to-all, but the real path lowers with the same code.
    cfg, moe, x = block
    mesh_cfg = MeshConfig(data=2, fsdp=1, expert=4, rules="ep")
    traced, lowered = _lower_block(moe, x, "ragged", mesh_cfg, grad=True)
    hlo = collectives_from_stablehlo(lowered.as_text())
    # dispatch (rows, their expert ids, their weights) + combine, and the float ones' transposes
    assert hlo["ragged_all_to_all"].count == 7
    traced_bytes = collectives_from_jaxpr(traced.jaxpr, dict(make_mesh(mesh_cfg).shape))
    # Each device sends at most M_l K rows (its distinct (token, device) pairs, counted at their
    # bound), each with J = min(K, E/P) ids and weights, each way, forward and backward.
    M_l, K, D = B * T // 8, cfg.num_experts_per_tok, cfg.hidden_size
    J = min(K, cfg.n_routed_experts // 4)
    expect = 4 * M_l * K * D * 4 + 3 * M_l * K * J * 4
    assert traced_bytes["ragged_all_to_all"].operand_bytes == expect
    if jax.default_backend() == "cpu":
        with pytest.raises(Exception, match="ragged"):
            lowered.compile()


def test_ragged_priority_exchange_only_when_a_buffer_can_overflow(block):
    # Worst-case buffer: no all_to_all beside the ragged ones (the backward's come from JAX's
    # transpose of ragged_all_to_all, which exchanges [P] int32 offsets). A smaller buffer adds
    # the priorities [P, S] f32 out and the keep counts [P] int32 back, forward only (no
    # gradient flows through the dropping decision).
    cfg, moe, x = block
    mesh_cfg = MeshConfig(data=2, fsdp=1, expert=4, rules="ep")
    P, M_l, K, D = 4, B * T // 8, cfg.num_experts_per_tok, cfg.hidden_size
    J = min(K, cfg.n_routed_experts // P)
    shape = dict(make_mesh(mesh_cfg).shape)
    S = ep_plan.capacity_sizes(
        M_l, cfg, P, budget=ep_plan.ragged_buffer_rows(M_l, cfg, P, 0.5)
    ).send_rows
    assert S < M_l * K
    for grad in (False, True):
        got = {}
        for factor in (None, 100.0, 0.5):
            traced, _ = _lower_block(moe, x, "ragged", mesh_cfg, grad, factor)
            c = collectives_from_jaxpr(traced.jaxpr, shape)
            got[factor] = c["all_to_all"].operand_bytes if "all_to_all" in c else 0
            # the data rows stay ragged: counted as min(M_l K, receive buffer) rows each way;
            # without dropping, one row per (token, device) pair with its ids and weights
            rows = min(M_l * K, 6 if factor == 0.5 else P * M_l * K)
            side = 0 if factor == 0.5 else (3 if grad else 2) * M_l * K * J * 4
            assert c["ragged_all_to_all"].operand_bytes == (4 if grad else 2) * rows * D * 4 + side
        assert got[None] == got[100.0] == (0 if not grad else got[None])
        # the dropping path has two float ragged exchanges to transpose, the pairs' three
        assert got[0.5] - got[None] == 4 * P * S + 4 * P - (2 * P * 4 if grad else 0), grad
    assert got[None] == 3 * 2 * P * 4  # the transposes' offsets only


def test_ragged_buffer_stays_a_hard_bound_with_protected_sequences(block):
    # With a buffer_factor the receive buffer is the budget itself: protected sequences (2 of
    # 8 here, one source each) rank first but do not grow it to the worst case, as the
    # capacity exchange's recv_rows would (4 x 6 x 2 rows).
    cfg, moe, x = block
    moe = nnx.merge(*nnx.split(moe))
    moe.cfg = cfg.replace(never_drop_share=0.25)
    mesh_cfg = MeshConfig(data=2, fsdp=1, expert=4, rules="ep")
    P, M_l, K, D = 4, B * T // 8, cfg.num_experts_per_tok, cfg.hidden_size
    budget = ep_plan.ragged_buffer_rows(M_l, cfg, P, 0.5)
    assert budget < M_l * K < ep_plan.capacity_sizes(M_l, moe.cfg, P, protected_tokens=T).recv_rows
    traced, _ = _lower_block(moe, x, "ragged", mesh_cfg, False, 0.5)
    c = collectives_from_jaxpr(traced.jaxpr, dict(make_mesh(mesh_cfg).shape))
    assert c["ragged_all_to_all"].operand_bytes == 2 * budget * D * 4  # min(sent, buffer) rows


# ---- node-limited routing, layouts, dispatch --------------------------------------------------
def test_node_limited_routing_bounds_nodes_per_token(block):
    cfg, moe, x = block
    r = moe.router(x.reshape(-1, cfg.hidden_size))
    nodes = np.asarray(ep.nodes_per_token(r.experts, cfg, ep_size=8))  # 4 nodes of 2 devices
    assert nodes.max() <= cfg.topk_group and nodes.max() == 2
    # V3 at scale: 256 experts over EP64, 8 groups = 8 nodes of 8 devices, 4 nodes per token.
    v3 = load_preset("deepseek-v3-671b")
    logits = jax.random.normal(jax.random.key(0), (512, v3.n_routed_experts))
    r = route(logits, None, v3)
    nodes = np.asarray(ep.nodes_per_token(r.experts, v3, ep_size=64))
    assert nodes.max() == v3.topk_group == 4
    assert ep.check_node_alignment(v3, 64) == 8  # devices per node
    odd = cfg.replace(n_routed_experts=12, n_group=3)
    with pytest.raises(ValueError, match="n_group=3"):
        ep.check_node_alignment(odd, 2)


def test_layout_validation_names_the_rule():
    sizes = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1, "stage": 1}
    with pytest.raises(ValueError, match="'batch'"):
        ep.ep_layout(sizes, {"batch": ("data",), "experts": "expert"})
    with pytest.raises(ValueError, match="expert_mlp"):
        ep.ep_layout(sizes, {"batch": ("data", "expert"), "expert_mlp": "data"})
    layout = ep.ep_layout(sizes, get_rules("fsdp_ep_tp"))
    assert (layout.ep_size, layout.batch_shards, layout.ffn_axes) == (4, 8, ("tensor",))


def test_parallel_config_alone_decides_the_moe_path(block):
    cfg, moe, x = block
    mesh_cfg = MeshConfig(data=2, fsdp=1, expert=4, rules="ep")
    mesh, rules = make_mesh(mesh_cfg), get_rules(mesh_cfg.rules)
    parallel = ParallelConfig.create(cfg.moe_impl, mesh, rules, backend="cpu")
    assert parallel.exchange == "ragged_emulated" and parallel.rules_dict == dict(rules)
    jaxpr = str(jax.make_jaxpr(lambda m, x: m(x, parallel=parallel))(moe, x))
    assert "shard_map" in jaxpr and "all_gather" in jaxpr  # the CPU default: emulated ragged
    # No ambient context: under a context mesh the call without a ParallelConfig stays local.
    with jax.set_mesh(mesh):
        assert "shard_map" not in str(jax.make_jaxpr(lambda m, x: m(x))(moe, x))
    assert hash(parallel) == hash(ParallelConfig.create(cfg.moe_impl, mesh, rules, backend="cpu"))
    assert default_exchange("dropless", backend="gpu") == "ragged"
    assert default_exchange("dropless", backend="cpu") == "ragged_emulated"
    assert default_exchange("capacity", backend="gpu") == "capacity"
    assert ParallelConfig.create("dropless", None, None).exchange == "none"
    dp1 = make_mesh(MeshConfig(data=1, fsdp=1, rules="dp"), jax.devices()[:1])  # no split
    assert ParallelConfig.create("dropless", dp1, get_rules("dp")).exchange == "none"
    explicit = ParallelConfig.create("dropless", mesh, rules, exchange="capacity")
    assert explicit.exchange == "capacity"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(exchange="alltoall"), "exchange"),
        (dict(buffer_factor=0.0), "buffer_factor"),
        (dict(mesh=None, exchange="ragged"), "mesh"),
        (dict(rules={"batch": "nope"}), "rules"),
        (dict(rules={"batch": None}, exchange="ragged"), "exchange"),
    ],
)
def test_parallel_config_errors_name_the_field(kwargs, field):
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, expert=4, rules="ep"))
    args = dict(mesh=mesh, rules=get_rules("ep"), exchange="none") | kwargs
    with pytest.raises(ValueError, match=f"ParallelConfig.{field}"):
        ParallelConfig(**args)
