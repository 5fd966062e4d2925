"""V2's device-level token dropping under expert parallelism (issue 11 item 4; V2 Sec. 2.2.3,
2.3): a receiving device over its budget drops the lowest raw-affinity assignments across all
sources; ~10% of sequences are never dropped; padding takes no budget. Both exchanges: the
fixed-buffer `capacity` one and the ragged one with a receive buffer below the worst case."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_preset
from deepseek_jax.moe import MoE, ep_plan, routed_dropless
from deepseek_jax.moe.router import Routing
from deepseek_jax.sharding.mesh import MeshConfig, make_mesh
from deepseek_jax.sharding.parallel import ParallelConfig
from deepseek_jax.sharding.rules import get_rules
from deepseek_jax.testing import MODEL_FP32, assert_close

B, T, P, GROUPS = 8, 6, 4, 2  # data=2 x expert=4: one sequence per device, two EP groups
MESH = MeshConfig(data=2, fsdp=1, expert=4, rules="ep")


def test_device_keep_by_hand():
    inf = -jnp.inf
    prio = jnp.array([[0.9, 0.2, inf], [0.5, 2.1, 0.3]])  # 2 sources x 3 rows; 2.1 protected
    keep = ep_plan.device_keep(prio, budget=2)
    np.testing.assert_array_equal(np.asarray(keep), [[1, 0, 0], [0, 1, 0]])
    keep = ep_plan.device_keep(prio, budget=0)  # no budget at all: the protected row still stays
    np.testing.assert_array_equal(np.asarray(keep), [[0, 0, 0], [0, 1, 0]])
    keep = ep_plan.device_keep(prio, budget=10)  # nothing unsent is ever kept
    np.testing.assert_array_equal(np.asarray(keep), [[1, 1, 0], [1, 1, 1]])
    # a hard budget (the ragged buffer): the protected row first, nothing past C
    keep = ep_plan.device_keep(prio, budget=1, hard=True)
    np.testing.assert_array_equal(np.asarray(keep), [[0, 0, 0], [0, 1, 0]])
    keep = ep_plan.device_keep(prio, budget=0, hard=True)
    np.testing.assert_array_equal(np.asarray(keep), [[0, 0, 0], [0, 0, 0]])
    prio2 = jnp.array([[2.9, 2.2], [2.5, 0.1]])  # three protected rows, budget 2
    keep = ep_plan.device_keep(prio2, budget=2, hard=True)
    np.testing.assert_array_equal(np.asarray(keep), [[1, 0], [1, 0]])


def test_protected_sequences_share():
    np.testing.assert_array_equal(ep_plan.protected_sequences(8, 0.25), [0, 0, 0, 1, 0, 0, 0, 1])
    assert ep_plan.protected_sequences(100, 0.1).sum() == 10
    assert not ep_plan.protected_sequences(8, 0.0).any()


@pytest.fixture(scope="module")
def block():
    cfg = load_preset("v3-tiny").replace(n_shared_experts=0)  # E=8, K=2, fp32
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    moe.router.bias[...] = 0.3 * jax.random.normal(jax.random.key(3), (cfg.n_routed_experts,))
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.hidden_size))
    mask = jnp.ones((B, T), bool).at[0, 4:].set(False).at[5, 1:].set(False)  # some padding
    return cfg, moe, x, mask


def _expected_keep(r, cfg, mask, share, budget=None, hard=False):
    """The V2 rule in numpy: per EP group and receiving device, keep the C highest affinities
    (+ every protected sequence's) among all sources' real assignments (C = `budget`, default
    ceil(capacity_factor M_l K)). `hard`: protected ones rank first but nothing past C stays
    (the ragged exchange's buffer)."""
    E_l, K, M_l = cfg.n_routed_experts // P, cfg.num_experts_per_tok, T
    C = math.ceil(cfg.capacity_factor * M_l * K) if budget is None else budget
    experts, scores = np.asarray(r.experts), np.asarray(r.scores)
    s = np.take_along_axis(scores, experts, 1)  # [M, K] raw affinities
    seq = np.arange(B * T) // T
    protect = ep_plan.protected_sequences(B, share)[seq]
    real = np.asarray(mask).reshape(-1)
    keep = np.zeros_like(s, bool)
    for g in range(GROUPS):
        tokens = np.arange(g * P * M_l, (g + 1) * P * M_l)  # sources = devices of the group
        for dev in range(P):
            cand = [(m, k) for m in tokens for k in range(K) if experts[m, k] // E_l == dev]
            cand = [(m, k) for m, k in cand if real[m]]
            cand.sort(key=lambda mk: -(s[mk] + 2.0 * protect[mk[0]]))
            for i, (m, k) in enumerate(cand):
                keep[m, k] = i < C or (protect[m] and not hard)
    return keep, real


def _run(moe, x, mask):
    parallel = ParallelConfig(make_mesh(MESH), get_rules(MESH.rules), exchange="capacity")
    return jax.jit(lambda m, x, k: m(x, k, parallel=parallel))(moe, x, mask)


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_device_level_dropping_matches_the_v2_rule(block, share):
    cfg, moe, x, mask = block
    moe = nnx.merge(*nnx.split(moe))
    moe.cfg = small = cfg.replace(capacity_factor=0.5, never_drop_share=share)
    out, stats = _run(moe, x, mask)
    xf = x.reshape(-1, cfg.hidden_size)
    r = moe.router(xf)
    keep, real = _expected_keep(r, small, mask, share)
    n_real = real.sum() * cfg.num_experts_per_tok
    assert 0 < keep.sum() < n_real  # the case drops something
    assert float(stats.dropped) == pytest.approx(1 - keep.sum() / n_real)
    kept = Routing(r.weights * keep, r.experts, r.scores)
    ws = (moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    expect = routed_dropless(xf, kept, *ws).reshape(B, T, -1)
    assert_close(out[np.asarray(mask)], expect[np.asarray(mask)], jnp.float32)


def test_no_device_over_budget_drops_nothing(block):
    # The old rule gave each (source, destination) pair ceil(cf M_l K / P) slots and dropped
    # assignments here although every device's total load fits its budget cf M_l K.
    cfg, moe, _, _ = block
    moe = nnx.merge(*nnx.split(moe))
    moe.router.bias[...] = jnp.zeros_like(moe.router.bias[...])
    # Each source sends its tokens to one device: sequence b aligns with expert 2 (b mod 4).
    w = moe.router.weight[...]  # [D, E]
    aim = w[:, 2 * (np.arange(B) % P)].T / jnp.linalg.norm(w[:, 0])  # [B, D]
    noise = jax.random.normal(jax.random.key(5), (B, T, cfg.hidden_size))
    x = 30.0 * aim[:, None, :] + 0.1 * noise
    r = moe.router(x.reshape(-1, cfg.hidden_size))
    E_l, K = cfg.n_routed_experts // P, cfg.num_experts_per_tok
    dest = np.asarray(r.experts).reshape(GROUPS, P, T, K) // E_l  # [group, source, token, K]
    load = np.stack([(dest == d).sum((1, 2, 3)) for d in range(P)], 1)  # [group, device]
    pair = np.stack([(dest == d).sum((2, 3)) for d in range(P)], 2)  # [group, source, device]
    cf = load.max() / (T * K)  # budget = exactly the busiest device's load
    old_slots = math.ceil(cf * T * K / P)
    assert (pair > old_slots).any()  # the per-pair rule would drop here
    moe.cfg = cfg.replace(capacity_factor=cf, never_drop_share=0.0)
    out, stats = _run(moe, x, jnp.ones((B, T), bool))
    assert float(stats.dropped) == 0.0
    xf = x.reshape(-1, cfg.hidden_size)
    ws = (moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    assert_close(out.reshape(xf.shape), routed_dropless(xf, r, *ws), jnp.float32)


def test_capacity_sizes():
    cfg = load_preset("v3-tiny")  # K=2, E=8
    sz = ep_plan.capacity_sizes(6, cfg.replace(capacity_factor=0.5), ep_size=4)
    assert sz == ep_plan.CapacitySizes(budget=6, pair_rows=12, send_rows=6, recv_rows=6)
    sz = ep_plan.capacity_sizes(6, cfg.replace(capacity_factor=0.5), ep_size=4, protected_tokens=6)
    assert sz.recv_rows == 4 * 6 * 2 and sz.send_rows == 12  # every protected arrival fits
    # The ragged exchange's budget is its buffer rows, whatever the capacity factor.
    sz = ep_plan.capacity_sizes(6, cfg.replace(capacity_factor=9.0), ep_size=4, budget=6)
    assert sz == ep_plan.CapacitySizes(budget=6, pair_rows=12, send_rows=6, recv_rows=6)


# ---- the ragged exchange with a receive buffer below the worst case ---------------------------
def _source_order_keep(r, cfg, mask, rows):
    """What a plan that clips each receiver's buffer by source order keeps: every assignment
    (padding included) sorted by expert per source, sources stacked in mesh order, the first
    `rows` of each receiver kept (the ragged exchange before V2's rule)."""
    E_l, K = cfg.n_routed_experts // P, cfg.num_experts_per_tok
    experts = np.asarray(r.experts).reshape(GROUPS, P, T * K)  # [group, source, assignment]
    keep = np.zeros_like(experts, bool)
    for g in range(GROUPS):
        used = np.zeros(P, int)
        for q in range(P):
            for a in np.argsort(experts[g, q], kind="stable"):
                d = experts[g, q, a] // E_l
                keep[g, q, a] = used[d] < rows
                used[d] += 1
    return keep.reshape(B * T, K) & np.asarray(mask).reshape(-1, 1)


def _ragged_grads(moe, x, mask, factor):
    parallel = ParallelConfig(
        make_mesh(MESH), get_rules(MESH.rules), "ragged_emulated", buffer_factor=factor
    )

    def loss(m, x):
        out, stats = m(x, mask, parallel=parallel)
        return (out**2).sum(), (out, stats)

    (g_m, g_x), (out, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(moe, x)
    return out, stats, g_x, nnx.state(g_m, nnx.Param)


@jax.jit
def _kept_reference(moe, x, keep):
    """(out, d/dx, d/dweights) of sum(out^2) for the single-device dropless path run on the
    kept assignments only (the others' gate weights zeroed)."""

    def loss(m, x):
        xf = x.reshape(-1, x.shape[-1])
        r = m.router(xf)
        kept = Routing(r.weights * keep, r.experts, r.scores)
        out = routed_dropless(xf, kept, m.w_gate[...], m.w_up[...], m.w_down[...])
        return (out**2).sum(), out.reshape(x.shape)

    (g_m, g_x), out = jax.grad(loss, argnums=(0, 1), has_aux=True)(moe, x)
    return out, g_x, nnx.state(g_m, nnx.Param)


@pytest.mark.parametrize("share,slope", [(0.0, 1.0), (0.25, -1.0)], ids=["later_wins", "protect"])
def test_ragged_overflow_drops_lowest_affinity_across_sources(block, share, slope):
    # Affinity to expert 0 rises with the source's place on the expert axis (later_wins) or
    # falls with it (protect: the last source of each group holds the protected sequence, and
    # its affinities are the lowest). The receive buffer is half the mean load.
    cfg, moe, x, _ = block
    moe = nnx.merge(*nnx.split(moe))
    moe.cfg = small = cfg.replace(never_drop_share=share)
    w0 = moe.router.weight[:, 0]
    src = jnp.arange(B) % P - 1.5  # [B] place of each sequence's source in its EP group
    x = x + (slope * 0.6 * src)[:, None, None] * w0 / jnp.sum(w0**2)  # logit of e_0 +- 0.6/step
    mask = jnp.ones((B, T), bool).at[3, 2:].set(False).at[6, 1:].set(False)  # padding
    factor, K = 0.5, cfg.num_experts_per_tok
    budget = math.ceil(factor * T * K)  # C = ragged_buffer_rows: 6 of a mean load of 12
    out, stats, g_x, g_w = _ragged_grads(moe, x, mask, factor)

    r = moe.router(x.reshape(-1, cfg.hidden_size))
    keep, real = _expected_keep(r, small, mask, share, budget, hard=True)
    n_real = real.sum() * K
    assert 0 < keep.sum() < n_real  # the case overflows
    # The case tells the rules apart: source order keeps other rows; padding counted as
    # candidates would take room from real rows; without protection others would be kept.
    assert (keep != _source_order_keep(r, cfg, mask, budget)).any()
    assert (
        keep
        != _expected_keep(r, small, np.ones((B, T), bool), share, budget, hard=True)[0]
        & real[:, None]
    ).any()
    protect = ep_plan.protected_sequences(B, share)[np.arange(B * T) // T][:, None] & real[:, None]
    if share:
        # the protected rows fit the buffer here, so they all stay (first in line)
        assert keep[np.broadcast_to(protect, keep.shape)].all()
        assert (keep != _expected_keep(r, small, mask, 0.0, budget, hard=True)[0]).any()

    assert float(stats.dropped) == pytest.approx(1 - keep.sum() / n_real)
    ref_out, ref_gx, ref_gw = _kept_reference(moe, x, jnp.asarray(keep, jnp.float32))
    assert_close(out, ref_out, **MODEL_FP32)  # padding rows: 0 in both
    assert_close(g_x, ref_gx, **MODEL_FP32)
    jax.tree.map(lambda a, b: assert_close(a, b, **MODEL_FP32), g_w, ref_gw)
