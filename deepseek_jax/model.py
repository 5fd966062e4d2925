"""The DeepSeek-V2/V3 decoder: embedding, scanned layer stacks, output head and MTP modules.

Layers are stacked (one leading `layers` axis per stack: the first `first_k_dense_replace` dense
layers, then the MoE layers) and applied with `jax.lax.scan` over the split NNX state, so compile
time does not grow with depth; `cfg.remat` picks the rematerialisation policy of a layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.attention import Attention, KVCache, init_kv_cache
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, linear, param
from deepseek_jax.mla import MLA, LatentCache, init_cache
from deepseek_jax.moe import MoE, MoEStats
from deepseek_jax.moe.router import RoutingBias, bias_update
from deepseek_jax.norm import RMSNorm
from deepseek_jax.sharding.logical import constrain
from deepseek_jax.sharding.parallel import ONE_DEVICE, ParallelConfig

ACT_BTD = ("batch", "seq", "embed")


class Block(nnx.Module):
    """Pre-norm decoder layer: h += Attn(norm(h)); h += FFN-or-MoE(norm(h)).

    Attn is MLA or standard MHA/GQA attention, as `cfg.attention_type` says.
    """

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype
        )
        self.attn = (
            MLA(cfg, rngs=rngs) if cfg.attention_type == "mla" else Attention(cfg, rngs=rngs)
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
        self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def __call__(
        self,
        h,
        positions,
        segment_ids=None,
        token_mask=None,
        parallel: ParallelConfig = ONE_DEVICE,
    ):
        """h [B, T, D] -> (h [B, T, D], MoEStats or None); `parallel` places the output and
        picks the MoE exchange."""
        h = h + self.attn(self.attn_norm(h), positions, segment_ids).astype(h.dtype)
        y = self.ffn_norm(h)
        if isinstance(self.ffn, MoE):
            y, stats = self.ffn(y, token_mask, parallel=parallel)
        else:
            y, stats = self.ffn(y), None
        return constrain(h + y.astype(h.dtype), ACT_BTD, parallel), stats

    def decode(self, h, positions, cache: LatentCache | KVCache):
        """h [B, T, D] at positions [B, T] (= cache slots) -> (h, cache).

        MoE routing is exact (the dropless plan on one device, partitioned by GSPMD on a mesh):
        a decode step's few tokens must not be dropped by a capacity meant for training batches.
        """
        a, cache = self.attn.decode(self.attn_norm(h), positions, cache)
        h = h + a.astype(h.dtype)
        y = self.ffn_norm(h)
        y = self.ffn(y, algorithm="dropless")[0] if isinstance(self.ffn, MoE) else self.ffn(y)
        return h + y.astype(h.dtype), cache


def stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module | None:
    """Builds `n` independently initialised copies of a module stacked on a leading axis.

    Each parameter's `logical_axes` metadata gains a leading 'layers' entry.
    """
    if n == 0:
        return None
    keys = jax.random.split(rngs.params(), n)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return make(nnx.Rngs(params=key))

    module = create(keys)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            var.set_metadata(
                "logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"])
            )
    return module


_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(
    stacked: nnx.Module, h: jax.Array, fn, xs=None, *, remat: str, unroll: bool, name="layer"
):
    """Applies `fn(layer, h, x) -> (h, y)` over the stacked layers with lax.scan.

    The NNX state is split once; inside the scan each slice is merged back into a layer, so the
    body is a pure function of (h, layer state). Returns (h, stacked ys). `name` is the stack's
    named scope: "<name><i>" per looped layer, "<name>s" around the scan.
    """
    graphdef, state = nnx.split(stacked)

    def body(carry, sliced):
        layer_state, x = sliced
        return fn(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=_POLICIES[remat], prevent_cse=False)
    # The named scopes put e.g. "moe_layer<i>" (or "moe_layers" when scanned) into the ops' names,
    # which is how a profile tells a layer's ops from the embedding, head and loss
    # (bench/profile_step.py).
    if unroll:  # a Python loop (cfg.scan_layers off, or to debug a single layer)
        n = jax.tree.leaves(state)[0].shape[0]
        ys = []
        for i in range(n):
            with jax.named_scope(f"{name}{i}"):
                h, y = body(h, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
            ys.append(y)
        return h, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None
    with jax.named_scope(f"{name}s"):
        return jax.lax.scan(body, h, (state, xs))


class Context(NamedTuple):
    """Per-call inputs every layer sees."""

    positions: jax.Array  # [B, T]
    segment_ids: jax.Array | None  # [B, T]
    token_mask: jax.Array | None  # [B, T] bool, False on padding
    parallel: ParallelConfig  # the model's: activation constraints and the MoE exchange
    unroll: bool


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    mtp_logits: jax.Array | None  # [n_mtp, B, T, V]; depth k at position i predicts t_{i+k+1}
    moe_stats: MoEStats | None  # each field stacked over MoE layers (MTP layers last): [L_moe, ...]


class MTPModule(nnx.Module):
    """One multi-token-prediction depth (V3 Sec. 2.2, eq. 21-23).

    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]  (embedding first, as the checkpoints
    concatenate it), h^k = TRM_k(h'), logits = OutHead(RMSNorm(h^k)) with the shared head.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.cfg = cfg
        self.enorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
        self.hnorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
        self.eh_proj = param(rngs, (2 * D, D), ("mtp_concat", "embed"), cfg)
        self.block = Block(cfg, moe=cfg.is_moe, rngs=rngs)
        self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)

    def __call__(self, h_prev, emb_next, positions, segment_ids, token_mask, parallel):
        """h_prev, emb_next [B, T, D] -> (h^k [B, T, D], normalised h^k, stats)."""
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1)  # [B, T, 2D]
        h = linear(x, self.eh_proj[...], self.cfg).astype(h_prev.dtype)  # [B, T, D]
        h, stats = self.block(h, positions, segment_ids, token_mask, parallel)
        return h, self.norm(h), stats

    def decode(self, h_prev, emb_next, positions, cache: LatentCache | KVCache):
        """The same over the module's own attention cache: -> (h^k, normalised h^k, cache)."""
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1)  # [B, T, 2D]
        h = linear(x, self.eh_proj[...], self.cfg).astype(h_prev.dtype)  # [B, T, D]
        h, cache = self.block.decode(h, positions, cache)
        return h, self.norm(h), cache


class DeepSeekModel(nnx.Module):
    """DeepSeek-V2/V3 causal LM. `model(input_ids)` -> ModelOutput.

    `parallel` (a static attribute) says how the forward pass runs on devices: the mesh and
    rules its activations are constrained to, and the MoE layers' expert-parallel exchange.
    The default is one device. `model(ids)` computes the same thing wherever it is called.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, parallel: ParallelConfig = ONE_DEVICE):
        self.cfg = cfg
        self.parallel = parallel
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = param(rngs, (V, D), ("vocab", "embed"), cfg)
        self.dense_layers = stack(
            lambda r: Block(cfg, moe=False, rngs=r), cfg.num_dense_layers, rngs
        )
        self.moe_layers = stack(lambda r: Block(cfg, moe=True, rngs=r), cfg.num_moe_layers, rngs)
        self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings else param(rngs, (D, V), ("embed", "vocab"), cfg)
        )
        self.mtp = stack(lambda r: MTPModule(cfg, rngs=r), cfg.num_nextn_predict_layers, rngs)

    def _embed(self, ids):
        return jnp.take(self.embed[...], ids, axis=0).astype(self.cfg.compute_dtype)  # [B, T, D]

    def head(self, h: jax.Array) -> jax.Array:
        """Normalised hidden [B, T, D] -> fp32 logits [B, T, V] (the head stays high precision)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h.astype(jnp.float32), w.astype(jnp.float32))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        unroll: bool = False,
    ) -> ModelOutput:
        """Forward pass.

        Args:
          input_ids: [B, T] int32 tokens.
          positions: [B, T] int32 (default arange(T)); restart per document when packed.
          segment_ids: [B, T] document ids of packed rows (0 = padding) or None.
          unroll: Python loop instead of lax.scan over layers (also when cfg.scan_layers is off).
        Returns:
          ModelOutput with fp32 logits [B, T, V], MTP logits and per-layer routing stats.
        """
        ctx = self.context(input_ids, positions, segment_ids, unroll)
        h = self.embed_and_dense(input_ids, ctx)
        h, stats = self.run_stack(self.moe_layers, h, ctx)
        logits, mtp_logits, mtp_stats = self.outputs(h, input_ids, ctx)
        stats = [s for s in (stats, mtp_stats) if s is not None]
        moe_stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
        return ModelOutput(logits, mtp_logits, moe_stats)

    def final_hidden(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        unroll: bool = False,
    ) -> tuple[jax.Array, MoEStats | None]:
        """The normalised last hidden state [B, T, D] that `head` maps to logits, and the MoEStats
        of the main stack; no head and no MTP modules (for log-probs chunked over T)."""
        ctx = self.context(input_ids, positions, segment_ids, unroll)
        h = self.embed_and_dense(input_ids, ctx)
        h, stats = self.run_stack(self.moe_layers, h, ctx)
        return self.norm(h), stats

    def replace_parallel(self, parallel: ParallelConfig) -> DeepSeekModel:
        """The same model (sharing its variables' values) running under `parallel`."""
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, state)
        model.parallel = parallel
        return model

    # The forward pass in three pieces, so that a pipeline can put them on different stages.
    def context(self, input_ids, positions=None, segment_ids=None, unroll=False):
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        token_mask = None if segment_ids is None else segment_ids > 0
        unroll = unroll or not self.cfg.scan_layers
        return Context(positions, segment_ids, token_mask, self.parallel, unroll)

    def embed_and_dense(self, input_ids: jax.Array, ctx: Context) -> jax.Array:
        """Token embedding and the first_k_dense_replace dense layers: [B, T] -> [B, T, D]."""
        h = constrain(self._embed(input_ids), ACT_BTD, ctx.parallel)
        return self.run_stack(self.dense_layers, h, ctx)[0]

    def run_stack(self, layers, h: jax.Array, ctx: Context):
        """Scans a stack of Blocks over h [B, T, D] -> (h, stacked MoEStats or None)."""
        if layers is None:
            return h, None

        def layer_fn(layer, h, _):
            return layer(h, ctx.positions, ctx.segment_ids, ctx.token_mask, ctx.parallel)

        name = "dense_layer" if layers is self.dense_layers else "moe_layer"
        return scan_layers(layers, h, layer_fn, remat=self.cfg.remat, unroll=ctx.unroll, name=name)

    def outputs(self, h: jax.Array, input_ids: jax.Array, ctx: Context):
        """Final norm + head, and the MTP modules on top of the last hidden state h^0.

        Returns (logits [B, T, V], mtp_logits [n_mtp, B, T, V] or None, MTP MoEStats or None).
        """
        logits = self.head(self.norm(h))
        if self.mtp is None:
            return logits, None, None

        # Depth k sees the embedding of t_{i+k}: shift the ids left by one per depth (the tail,
        # which has no such token, is masked out of the loss).
        def mtp_fn(module, carry, _):
            h_prev, ids = carry
            ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
            h_k, normed, s = module(
                h_prev,
                self._embed(ids),
                ctx.positions,
                ctx.segment_ids,
                ctx.token_mask,
                ctx.parallel,
            )
            return (h_k, ids), (self.head(normed), s)

        _, (mtp_logits, stats) = scan_layers(
            self.mtp,
            (h, input_ids),
            mtp_fn,
            remat=self.cfg.remat,
            unroll=ctx.unroll,
            name="mtp_layer",
        )
        return logits, mtp_logits, stats

    # ---- the parameter tree by role: callers select with these, never by attribute names ------
    def moe_stacks(self) -> list[nnx.Module]:
        """The stacks whose layers route tokens, in the order of `ModelOutput.moe_stats` rows:
        the MoE layers, then the MTP modules (whose blocks are MoE blocks in an MoE model)."""
        if not self.cfg.is_moe:
            return []
        return [s for s in (self.moe_layers, self.mtp) if s is not None]

    def apply_bias_update(self, counts: jax.Array, gamma: jax.Array | float) -> None:
        """Aux-loss-free balancing (V3 Sec. 2.1.2): b += gamma * sign(mean load - load) on every
        `RoutingBias`, in place.

        Args:
          counts: [L, E] expert counts over the global batch, rows in `moe_stats` order. Fewer
            rows than MoE layers (an objective that skips the MTP modules) leave the biases of
            the missing trailing layers as they are.
          gamma: [] update speed.
        """
        biases = [
            var
            for stack in self.moe_stacks()
            for _, var in nnx.iter_graph(stack)
            if isinstance(var, RoutingBias)
        ]
        total = sum(b.shape[0] for b in biases)
        if counts.shape[0] > total:
            raise ValueError(
                f"routing biases cover {total} MoE layers but the counts have {counts.shape[0]}"
            )
        counts = jnp.pad(counts, ((0, total - counts.shape[0]), (0, 0)))  # sign(0 - 0) = 0
        start = 0
        for var in biases:
            n = var.shape[0]
            var[...] = bias_update(var[...], counts[start : start + n], gamma)
            start += n

    def pipeline_stack(self) -> str:
        """The attribute name of the layer stack a pipeline splits over its stages: the MoE
        layers (the dense ones run on the first stage), or a dense model's one stack."""
        return "moe_layers" if self.cfg.is_moe else "dense_layers"

    def param_groups(self) -> dict[str, tuple[str, ...]]:
        """Attribute names of the model's parts: "embedding", "layers" (both stacks), "head"
        (final norm and output head) and "mtp" (the MTP modules, outside the main model)."""
        return {
            "embedding": ("embed",),
            "layers": ("dense_layers", "moe_layers"),
            "head": ("norm", "lm_head"),
            "mtp": ("mtp",),
        }

    def routed_expert_params(self) -> list[nnx.Param]:
        """The routed experts' weights of the main model (not of the MTP modules): the
        parameters an MoE layer holds itself, outside its router and shared-expert submodules."""
        if self.moe_layers is None:
            return []
        out = []
        for _, node in nnx.iter_graph(self.moe_layers):
            if isinstance(node, MoE):
                out += [v for _, v in nnx.iter_children(node) if isinstance(v, nnx.Param)]
        return out

    # ---- inference with the attention cache ---------------------------------------------------
    def init_cache(
        self, batch: int, max_len: int, dtype=jnp.float32
    ) -> list[LatentCache | KVCache]:
        """One cache per layer stack, stacked on a leading layers axis: MLA's LatentCache
        ([L, B, S, C], [L, B, S, R]) or standard attention's KVCache ([L, B, S, N_kv, H] twice)."""
        cfg = self.cfg
        caches = []
        for layers, n in (
            (self.dense_layers, cfg.num_dense_layers),
            (self.moe_layers, cfg.num_moe_layers),
        ):
            if layers is not None:
                if cfg.attention_type == "mla":
                    c = init_cache(cfg, batch, max_len, dtype)
                else:
                    c = init_kv_cache(cfg, batch, max_len, dtype)
                caches.append(jax.tree.map(lambda a, n=n: jnp.broadcast_to(a, (n,) + a.shape), c))
        return caches

    def decode(
        self,
        input_ids: jax.Array,
        caches: list[LatentCache | KVCache],
        positions: jax.Array,
    ):
        """Runs T new tokens of each row at `positions` through the cached attention path.

        Slot index == position (see decode_cache.py): row b's tokens are written at slots
        positions[b, :] and each attends the slots up to its own position, so rows of a ragged
        batch advance independently.

        Args:
          input_ids: [B, T]; caches: from `init_cache`; positions: [B, T] int32.
        Returns:
          (logits [B, T, V] fp32, updated caches).
        """
        h, new = self.decode_hidden(input_ids, caches, positions)
        return self.head(self.norm(h)), new

    def decode_hidden(
        self,
        input_ids: jax.Array,
        caches: list[LatentCache | KVCache],
        positions: jax.Array,
    ):
        """`decode` without the final norm and head: -> (last hidden h^0 [B, T, D], caches).

        h^0 is what the MTP modules take as h^{k-1} for k = 1 (speculative drafting)."""
        positions = jnp.asarray(positions, jnp.int32)
        if positions.shape != input_ids.shape:
            raise ValueError(
                f"decode: positions{positions.shape} must match input_ids{input_ids.shape}"
            )
        kind = LatentCache if self.cfg.attention_type == "mla" else KVCache
        h = self._embed(input_ids)

        def layer_fn(layer, h, cache):
            return layer.decode(h, positions, kind(*cache))

        new = []
        stacks = [s for s in (self.dense_layers, self.moe_layers) if s is not None]
        for layers, cache in zip(stacks, caches, strict=True):
            h, c = scan_layers(layers, h, layer_fn, tuple(cache), remat="none", unroll=False)
            new.append(kind(*c))
        return h, new

    def init_mtp_caches(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        """One attention cache per MTP module ([B, S, ...] each, unstacked)."""
        cfg = self.cfg
        make = init_cache if cfg.attention_type == "mla" else init_kv_cache
        return [make(cfg, batch, max_len, dtype) for _ in range(cfg.num_nextn_predict_layers)]

    def mtp_decode(self, m: int, h_prev, next_ids, positions, cache):
        """MTP module m (0-based, depth k = m + 1) over its own cache (speculative drafting).

        Args:
          m: module index; h_prev: h^{k-1} [B, T, D] (h^0 = `decode_hidden`'s output);
          next_ids: [B, T] the tokens t_{i+k}; positions: [B, T] int32 (= cache slots);
          cache: this module's cache from `init_mtp_caches`.
        Returns:
          (fp32 logits of t_{i+k+1} [B, T, V], h^k [B, T, D], updated cache).
        """
        graphdef, state = nnx.split(self.mtp)
        module = nnx.merge(graphdef, jax.tree.map(lambda a: a[m], state))
        h, normed, cache = module.decode(
            h_prev, self._embed(next_ids), jnp.asarray(positions, jnp.int32), cache
        )
        return self.head(normed), h, cache
