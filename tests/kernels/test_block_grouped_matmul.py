"""Block-sparse grouped GEMM and the blocked dropless MoE vs ragged_dot and one-hot references;
its FP8 form vs grouped_matmul_fp8."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import fp8_weights
from deepseek_jax.kernels import block_grouped_matmul as bgm
from deepseek_jax.kernels import grouped_matmul as gm
from deepseek_jax.moe import routed_blocked, routed_dropless, routed_reference
from deepseek_jax.moe.router import Routing
from deepseek_jax.testing import assert_close

E, D, F = 4, 24, 16


def _normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# (name, experts [M, K]): balanced; every token on experts 0 and 1 (experts 2, 3 empty, group
# sizes far from tile multiples); a single token; long groups of 23, 13 and 10 tiles of 8 rows,
# which the product takes in chunks of 8 + 8 + 4 + 2 + 1, 8 + 4 + 1 and 8 + 2 tiles.
ROUTINGS = {
    "spread": np.random.default_rng(3).permuted(np.tile(np.arange(E), (19, 1)), axis=1)[:, :2],
    "skewed": np.tile([1, 0], (21, 1)),
    "single": np.array([[3, 1]]),
    "long": np.stack([np.zeros(184, int), np.repeat([1, 2], [104, 80])], 1),
}


def _routing(name):
    experts = jnp.asarray(ROUTINGS[name], jnp.int32)
    weights = jax.nn.softmax(_normal(experts.shape, 4), -1)
    return Routing(weights, experts, None)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_layout_places_every_assignment_once_in_a_tile_of_its_group(name):
    block = 8
    experts = jnp.asarray(ROUTINGS[name].reshape(-1), jnp.int32)
    lay = bgm.block_layout(experts, E, block)
    slot, source, tile_group = map(np.asarray, (lay.slot, lay.source, lay.tile_group))
    R = experts.shape[0]
    assert len(set(slot.tolist())) == R  # distinct slots
    np.testing.assert_array_equal(source[slot], np.arange(R))  # source inverts slot
    assert (source == R).sum() == source.size - R  # every other slot is padding
    np.testing.assert_array_equal(tile_group[slot // block], np.asarray(experts))
    sizes = np.bincount(np.asarray(experts), minlength=E)
    assert int(lay.tiles_used) == int(np.ceil(sizes / block).sum())
    assert tile_group.size == bgm.num_tiles(R, E, block) >= int(lay.tiles_used)
    # Tiles in use come first, in group order; a group's assignments keep their order.
    assert (np.diff(tile_group) >= 0).all()
    for e in range(E):
        assert (np.diff(slot[np.asarray(experts) == e]) > 0).all()


@pytest.mark.parametrize("name", ["skewed", "long"])
def test_block_gmm_matches_ragged_dot_and_reference_forward_and_vjp(name):
    experts = jnp.asarray(ROUTINGS[name].reshape(-1), jnp.int32)
    R = experts.shape[0]
    order = jnp.argsort(experts, stable=True)
    sizes = jnp.bincount(experts, length=E).astype(jnp.int32)
    x, w = _normal((R, D), 0), _normal((E, D, F), 1)
    cot = _normal((R, F), 2)

    def blocked(x, w):  # rows in assignment order -> tiles -> back, sorted like the others
        lay = bgm.block_layout(experts, E, 8)
        xs = jnp.take(x, lay.source, axis=0, mode="fill", fill_value=0)  # [P, D]
        out = bgm.block_gmm(xs, w, lay)  # [P, F]
        return out[lay.slot][order]  # [R, F] in group order

    def grouped(x, w):
        return gm.grouped_matmul(x[order], w, sizes, impl="xla")

    def ref(x, w):
        return gm.reference(x[order], w, sizes)

    outs = {}
    for fn in (blocked, grouped, ref):
        y, vjp = jax.vjp(jax.jit(fn), x, w)
        outs[fn.__name__] = (y, *vjp(cot))
    for got, want, theirs in zip(outs["blocked"], outs["ref"], outs["grouped"], strict=True):
        assert_close(got, want)
        assert_close(got, theirs)


def _moe_case(dtype=jnp.float32):
    ws = (_normal((E, D, F), 5, dtype), _normal((E, D, F), 6, dtype), _normal((E, F, D), 7, dtype))
    return tuple(w * 0.3 for w in ws)


def _moe_vjp(name):
    """fn -> (y, dx, dgates, dw_gate, dw_up, dw_down) of the routed experts `fn` on routing
    `name`, with fixed tokens, weights and cotangent."""
    r = _routing(name)
    x = _normal((r.experts.shape[0], D), 8)
    ws = _moe_case()
    cot = _normal(x.shape, 9)

    def run(fn):
        def f(x, g, *w):
            return fn(x, Routing(g, r.experts, None), *w)

        y, vjp = jax.vjp(jax.jit(f), x, r.weights, *ws)
        return (y, *vjp(cot))

    return run


@pytest.mark.parametrize("name", ["spread", "skewed"])
def test_blocked_moe_equals_ragged_and_reference_forward_and_gradients(name):
    run = _moe_vjp(name)
    blocked = run(routed_blocked)
    grouped = run(lambda *a: routed_dropless(*a, gmm="grouped"))
    reference = run(routed_reference)
    for got, want, theirs in zip(blocked, reference, grouped, strict=True):
        assert_close(got, want)
        assert_close(got, theirs)


def test_dropless_auto_is_blocked_on_cpu_and_bf16_stays_close():
    r = _routing("spread")
    x = _normal((r.experts.shape[0], D), 8, jnp.bfloat16)
    ws = _moe_case(jnp.bfloat16)
    auto = jax.jit(routed_dropless)(x, r, *ws)
    blocked = jax.jit(routed_blocked)(x, r, *ws)
    assert auto.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(blocked, np.float32))
    f32 = [a.astype(jnp.float32) for a in (x, *ws)]
    ref = routed_reference(f32[0], r, *f32[1:])
    assert_close(blocked, ref, jnp.bfloat16)


def test_block_gmm_fp8_equals_grouped_fp8_over_the_padded_rows():
    # The blocked FP8 product is grouped_matmul_fp8 with the rows in the padded layout (group
    # sizes = tiles x block): the same 1 x 128 / 128 x 128 / 128 x 1 tiles, so the same values
    # up to FP32 rounding, forward and VJP; BF16 tokens under FP32 master weights (dx in BF16,
    # dW in FP32). 368 rows (three 128-row wgrad tiles), K = 200 (two 128-wide blocks), gate
    # and up with 72 columns each and 10x apart in size: quantizing their concatenation on one
    # grid would share scales across them and fail this.
    k, n, dtype = 200, 72, jnp.bfloat16
    experts = jnp.asarray(ROUTINGS["long"].reshape(-1), jnp.int32)
    lay = bgm.block_layout(experts, E, 8)
    xs = jnp.take(_normal((experts.shape[0], k), 10, dtype), lay.source, 0, mode="fill")
    w_gate, w_up = 0.1 * _normal((E, k, n), 11), _normal((E, k, n), 12)  # FP32 master weights
    tiles = np.bincount(np.asarray(lay.tile_group)[: int(lay.tiles_used)], minlength=E)
    sizes = jnp.asarray(tiles * lay.block, jnp.int32)
    live = np.arange(xs.shape[0]) < int(lay.tiles_used) * lay.block  # rows of tiles in use
    cot = jnp.where(live[:, None], _normal((xs.shape[0], 2 * n), 13, dtype), 0)

    def blocked(xs, w_gate, w_up):
        return bgm.block_gmm_fp8(xs, (w_gate, w_up), lay)

    def grouped(xs, w_gate, w_up):
        return jnp.concatenate(
            [gm.grouped_matmul_fp8(xs, w, sizes, impl="xla") for w in (w_gate, w_up)], axis=-1
        )

    got, want = (jax.vjp(jax.jit(f), xs, w_gate, w_up) for f in (blocked, grouped))
    got, want = (got[0], *got[1](cot)), (want[0], *want[1](cot))
    assert [a.dtype for a in got] == [dtype, dtype, jnp.float32, jnp.float32]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, a.dtype)
    assert not np.asarray(got[0])[~live].any()  # padding slots stay zero


def test_blocked_fp8_moe_equals_grouped_fp8_and_tracks_exact():
    run = _moe_vjp("skewed")  # group sizes far from tile multiples, two experts empty
    blocked = run(lambda *a: routed_dropless(*a, fp8=True, gmm="blocked"))
    grouped = run(lambda *a: routed_dropless(*a, fp8=True, gmm="grouped"))
    exact = run(routed_reference)
    for got, theirs, want in zip(blocked, grouped, exact, strict=True):
        assert_close(got, theirs)
        want = np.asarray(want)
        assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 2.0**-3  # FP8, not exact


def test_blocked_moe_with_stored_fp8_experts_equals_grouped_and_the_recipe():
    # Serving: E4M3 expert weights as stored, the forward on the tile layout. Twins: the same
    # stored weights through ragged_dot (gmm="grouped"), and the FP8 training recipe over the
    # dequantized weights (re-quantizing them gives back the stored blocks).
    r = _routing("long")  # groups of 23, 13 and 10 tiles: every chunk size
    x = _normal((r.experts.shape[0], 160), 8)  # K = 160: two 128-wide blocks
    shapes = ((E, 160, 72), (E, 160, 72), (E, 72, 160))
    dense = [_normal(shape, 20 + i) / np.sqrt(shape[1]) for i, shape in enumerate(shapes)]
    stored = [fp8_weights.quantize(w, stack_dims=1) for w in dense]
    dequantized = [w.astype(jnp.float32) for w in stored]
    blocked = jax.jit(lambda x, *w: routed_dropless(x, r, *w, gmm="blocked"))(x, *stored)
    grouped = jax.jit(lambda x, *w: routed_dropless(x, r, *w, gmm="grouped"))(x, *stored)
    recipe = jax.jit(lambda x, *w: routed_dropless(x, r, *w, fp8=True))(x, *dequantized)
    assert_close(blocked, grouped)
    assert_close(blocked, recipe)
    exact = routed_reference(x, r, *dense)
    err = np.linalg.norm(np.asarray(blocked - exact)) / np.linalg.norm(np.asarray(exact))
    assert 0 < err < 2.0**-3


def test_blocked_fp8_served_and_recipe_agree_over_many_tokens():
    # The blocked FP8 products multiply the E4M3 values exactly block by block and scale each
    # block's sum, as the grouped kernel does. So the stored serving weights and the training
    # recipe over their dequantized values (scales re-derived, an ulp off in half the blocks)
    # agree to an ulp, and no E4M3 rounding downstream (of the SwiGLU output, before the down
    # product) flips between them: products of dequantized operands flipped 2 of these 512
    # tokens by ~5e-3. Against the grouped kernel (other sum orders) a flip stays rare.
    e, d, f, m = 8, 256, 128, 512
    rng = np.random.default_rng(5)
    experts = jnp.asarray(np.stack([rng.permutation(e)[:2] for _ in range(m)]), jnp.int32)
    r = Routing(jax.nn.softmax(_normal((m, 2), 4), -1), experts, None)
    x = _normal((m, d), 8)
    shapes = ((e, d, f), (e, d, f), (e, f, d))
    dense = [_normal(shape, 30 + i) / np.sqrt(shape[1]) for i, shape in enumerate(shapes)]
    stored = [fp8_weights.quantize(w, stack_dims=1) for w in dense]
    dequantized = [w.astype(jnp.float32) for w in stored]
    out = {}
    for gmm in ("blocked", "grouped"):
        for name, ws, fp8 in (("stored", stored, False), ("recipe", dequantized, True)):
            fn = functools.partial(routed_dropless, fp8=fp8, gmm=gmm)
            out[name, gmm] = np.asarray(jax.jit(lambda x, *w, fn=fn: fn(x, r, *w))(x, *ws))
    np.testing.assert_allclose(
        out["stored", "blocked"], out["recipe", "blocked"], atol=1e-5, rtol=0
    )
    for name in ("stored", "recipe"):
        rows = np.abs(out[name, "blocked"] - out[name, "grouped"]).max(1)
        assert (rows > 1e-5).sum() <= m // 100 and rows.max() < 1e-2, (name, np.sort(rows)[-5:])


def test_choose_block_bounds_padding():
    assert bgm.choose_block(8192, 16) == 64  # v3-small, B x T = 8 x 256, top-4 of 16
    assert bgm.choose_block(32, 8) == 8  # tiny batches: the smallest tile
    # v3-small's 143 tiles in 16 groups take every chunk size; tiny products single tiles only
    assert bgm._chunk_sizes(143, 16) == (8, 4, 2, 1)
    assert bgm._chunk_sizes(20, 8) == (1,)
    for rows, groups in [(8192, 16), (65536, 256), (1 << 20, 256)]:
        b = bgm.choose_block(rows, groups)
        assert groups * (b - 1) <= rows // 8 or b == 8


def test_errors_name_the_operands():
    lay = bgm.block_layout(jnp.zeros((4,), jnp.int32), E, 8)  # (4 + 4 * 7) // 8 = 4 tiles of 8 rows
    with pytest.raises(ValueError, match=r"xs must be \[P, K\]"):
        bgm.block_gmm(jnp.zeros((32, D)), jnp.zeros((E, D + 1, F)), lay)
    with pytest.raises(ValueError, match="must equal 4 tiles x block 8"):
        bgm.block_gmm(jnp.zeros((16, D)), jnp.zeros((E, D, F)), lay)
    with pytest.raises(TypeError, match="xs.dtype"):
        bgm.block_gmm(jnp.zeros((32, D)), jnp.zeros((E, D, F), jnp.bfloat16), lay)
    with pytest.raises(ValueError, match=r"w\[1\] \[E, K, N\]"):
        bgm.block_gmm_fp8(jnp.zeros((32, D)), (jnp.zeros((E, D, F)), jnp.zeros((E, F, D))), lay)
    with pytest.raises(ValueError, match="expert count"):
        bgm.block_gmm_fp8(jnp.zeros((32, D)), (jnp.zeros((E, D, F)), jnp.zeros((2, D, F))), lay)
    with pytest.raises(ValueError, match="gmm='ragged'"):
        routed_dropless(jnp.zeros((2, D)), _routing("single"), *_moe_case(), gmm="ragged")
