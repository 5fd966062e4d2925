"""Hub tensor names and layouts <-> our parameter tree.

DeepSeek's published checkpoints (and transformers' `save_pretrained`, which writes the same
per-expert layout) name one tensor per layer and per expert, PyTorch `nn.Linear` style
([out, in]). Our model stacks layers (and experts) on leading axes and multiplies `x @ W`, with
head axes explicit. Each of our parameters is described by a `ParamMap`: its path in the NNX
state, the hub name template of one piece, the stack it is assembled from and how a piece is
laid out. Every piece transform is either the identity or "transpose, then reshape"
(`hub.T.reshape(piece_shape)`), whose inverse is `ours.reshape(hub_shape[::-1]).T`; both are
exact, which is what makes hub -> ours -> hub bit-exact.

Hub layer indices: dense layers are 0..k-1, MoE layers k..L-1, and MTP depth d is layer L + d
(`model.layers.{L+d}.{embed_tokens,enorm,hnorm,eh_proj,shared_head.{norm,head}}` plus a full
decoder block). Our MTP modules share the main embedding and output head, so the MTP's
`embed_tokens` and `shared_head.head` are not parameters of ours: on load they are checked
against the main ones, on export they are written as copies (`mtp_copies`).

`partition_spec` lays our parameters out on a mesh from their logical axes (used to restore
sharded and to chunk converted checkpoints along shard boundaries).

RoPE: DeepSeek checkpoints were trained rotating *adjacent* pairs of the rope dims (V2's complex
`freqs_cis`; transformers' V3 `rope_interleave=True`). The weights are stored as trained, so no
permutation happens here; the model applies the rotation with `cfg.rope_interleave`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf.safetensors_io import FLOAT_CODES, CheckpointError, TensorInfo
from deepseek_jax.sharding.rules import DEFAULT_RULES, RULE_PRESETS, spec_for

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """How one of our (possibly stacked) parameters is assembled from hub tensors.

    Attributes:
      path: path in the model's NNX state, e.g. ("moe_layers", "ffn", "w_gate").
      template: hub name of one piece, with `{layer}` / `{expert}` fields.
      layers: hub layer index of each entry of the leading layer axis (empty: not stacked).
      num_experts: size of the expert axis after the layer axis (0: none).
      piece_shape: our shape of one piece (without the stack axes).
      hub_shape: the hub tensor's shape.
      transposed: piece = hub.T.reshape(piece_shape); else piece = hub.
      fp32: always float32 (the routing selection bias).
      quantizable: a linear weight DeepSeek stores in FP8 (decoder-block projections).
    """

    path: Path
    template: str
    layers: tuple[int, ...]
    num_experts: int
    piece_shape: tuple[int, ...]
    hub_shape: tuple[int, ...]
    transposed: bool
    fp32: bool = False
    quantizable: bool = False

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return ((len(self.layers),) if self.layers else ()) + (
            (self.num_experts,) if self.num_experts else ()
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + self.piece_shape

    @property
    def name(self) -> str:
        """Orbax's name of this parameter (keys joined by '.')."""
        return ".".join(self.path)

    def pieces(self) -> Iterator[tuple[tuple[int, ...], str]]:
        """(stack index, hub name) of every piece, layers outermost."""
        layer_ids = list(enumerate(self.layers)) if self.layers else [(None, None)]
        expert_ids = range(self.num_experts) if self.num_experts else [None]
        for (li, layer), e in itertools.product(layer_ids, expert_ids):
            index = tuple(i for i in (li, e) if i is not None)
            yield index, self.template.format(layer=layer, expert=e)

    @property
    def row_axis(self) -> int | None:
        """Axis of a piece that the hub tensor's first axis maps onto one-to-one, or None.

        Along it a piece can be streamed in row blocks (hub rows r0:r1 <-> piece[..r0:r1..]).
        """
        if not self.transposed:
            return 0
        return 1 if len(self.piece_shape) == 2 and len(self.hub_shape) == 2 else None

    def to_ours(self, hub: np.ndarray) -> np.ndarray:
        """Hub tensor (or a block of its rows) -> our piece (or the matching block)."""
        if not self.transposed:
            return hub
        if self.row_axis == 1:
            return hub.T
        return hub.T.reshape(self.piece_shape)

    def to_hub(self, ours: np.ndarray) -> np.ndarray:
        """Our piece (or a block along `row_axis`) -> hub tensor (or its rows)."""
        if not self.transposed:
            return ours
        if self.row_axis == 1:
            return ours.T
        return ours.reshape(self.hub_shape[::-1]).T


def _block_maps(
    cfg: ModelConfig, stack: Path, layers: tuple[int, ...], moe: bool
) -> list[ParamMap]:
    """ParamMaps of one stack of decoder blocks (attention, norms, dense MLP or MoE)."""
    D, N = cfg.hidden_size, cfg.num_attention_heads
    C, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_head_dim
    nope_v, v = cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.v_head_dim
    pre = "model.layers.{layer}."

    def m(path, name, piece, hub, transposed=True, experts=0, **kw):
        return ParamMap(stack + path, pre + name, layers, experts, piece, hub, transposed, **kw)

    def lin(path, name, piece, hub, experts=0):
        return m(path, name, piece, hub, experts=experts, quantizable=True)

    def norm(path, name, dim):
        return m(path, name, (dim,), (dim,), transposed=False)

    out = [
        norm(("attn_norm", "weight"), "input_layernorm.weight", D),
        norm(("ffn_norm", "weight"), "post_attention_layernorm.weight", D),
    ]
    if cfg.attention_type == "mha":
        out += _mha_maps(cfg, lin)
    elif cfg.q_lora_rank is not None:
        Q = cfg.q_lora_rank
        out += [
            lin(("attn", "wq_a"), "self_attn.q_a_proj.weight", (D, Q), (Q, D)),
            norm(("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", Q),
            lin(("attn", "wq_b"), "self_attn.q_b_proj.weight", (Q, N, H), (N * H, Q)),
        ]
    else:
        out.append(lin(("attn", "wq"), "self_attn.q_proj.weight", (D, N, H), (N * H, D)))
    if cfg.attention_type == "mla":
        out += [
            lin(("attn", "wkv_a"), "self_attn.kv_a_proj_with_mqa.weight", (D, C + R), (C + R, D)),
            norm(("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", C),
            lin(("attn", "wkv_b"), "self_attn.kv_b_proj.weight", (C, N, nope_v), (N * nope_v, C)),
            lin(("attn", "wo"), "self_attn.o_proj.weight", (N, v, D), (D, N * v)),
        ]
    if not moe:
        F = cfg.intermediate_size
        return out + _mlp_maps(lin, ("ffn",), "mlp.", D, F)
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    out.append(m(("ffn", "router", "weight"), "mlp.gate.weight", (D, E), (E, D)))
    if cfg.topk_method == "noaux_tc":
        out.append(
            m(
                ("ffn", "router", "bias"),
                "mlp.gate.e_score_correction_bias",
                (E,),
                (E,),
                transposed=False,
                fp32=True,
            )
        )
    ex = "mlp.experts.{expert}."
    out += [
        lin(("ffn", "w_gate"), ex + "gate_proj.weight", (D, F), (F, D), experts=E),
        lin(("ffn", "w_up"), ex + "up_proj.weight", (D, F), (F, D), experts=E),
        lin(("ffn", "w_down"), ex + "down_proj.weight", (F, D), (D, F), experts=E),
    ]
    if cfg.n_shared_experts:
        Fs = F * cfg.n_shared_experts
        out += _mlp_maps(lin, ("ffn", "shared"), "mlp.shared_experts.", D, Fs)
    return out


def _mha_maps(cfg: ModelConfig, lin) -> list[ParamMap]:
    """Standard attention as in `LlamaForCausalLM` (DeepSeek LLM / DeepSeekMath): q/k/v/o_proj.

    The hub stores q and k already permuted for half-split RoPE (what HF Llama applies), and
    `cfg.rope_interleave=False` rotates the same pairs, so the weights map without permutation.
    """
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
    return [
        lin(("attn", "wq"), "self_attn.q_proj.weight", (D, N, H), (N * H, D)),
        lin(("attn", "wk"), "self_attn.k_proj.weight", (D, K, H), (K * H, D)),
        lin(("attn", "wv"), "self_attn.v_proj.weight", (D, K, H), (K * H, D)),
        lin(("attn", "wo"), "self_attn.o_proj.weight", (N, H, D), (D, N * H)),
    ]


def _mlp_maps(lin, path: Path, prefix: str, D: int, F: int) -> list[ParamMap]:
    return [
        lin(path + ("w_gate",), prefix + "gate_proj.weight", (D, F), (F, D)),
        lin(path + ("w_up",), prefix + "up_proj.weight", (D, F), (F, D)),
        lin(path + ("w_down",), prefix + "down_proj.weight", (F, D), (D, F)),
    ]


def param_maps(cfg: ModelConfig) -> list[ParamMap]:
    """Every parameter of `DeepSeekModel(cfg)` with its hub source, in hub order."""
    V, D, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    k = cfg.num_dense_layers
    out = [ParamMap(("embed",), "model.embed_tokens.weight", (), 0, (V, D), (V, D), False)]
    if k:
        out += _block_maps(cfg, ("dense_layers",), tuple(range(k)), moe=False)
    if cfg.num_moe_layers:
        out += _block_maps(cfg, ("moe_layers",), tuple(range(k, L)), moe=True)
    if cfg.num_nextn_predict_layers:
        mtp = tuple(range(L, L + cfg.num_nextn_predict_layers))
        pre = "model.layers.{layer}."

        def m(path, name, piece, hub, transposed=False):
            return ParamMap(("mtp",) + path, pre + name, mtp, 0, piece, hub, transposed)

        out += [
            m(("enorm", "weight"), "enorm.weight", (D,), (D,)),
            m(("hnorm", "weight"), "hnorm.weight", (D,), (D,)),
            m(("eh_proj",), "eh_proj.weight", (2 * D, D), (D, 2 * D), transposed=True),
            m(("norm", "weight"), "shared_head.norm.weight", (D,), (D,)),
        ]
        out += _block_maps(cfg, ("mtp", "block"), mtp, moe=cfg.is_moe)
    out.append(ParamMap(("norm", "weight"), "model.norm.weight", (), 0, (D,), (D,), False))
    if not cfg.tie_word_embeddings:
        out.append(ParamMap(("lm_head",), "lm_head.weight", (), 0, (D, V), (V, D), True))
    return out


def mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """Hub names of each MTP depth's embedding/head -> the main hub tensor they duplicate."""
    L = cfg.num_hidden_layers
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out = {}
    for layer in range(L, L + cfg.num_nextn_predict_layers):
        out[f"model.layers.{layer}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{layer}.shared_head.head.weight"] = head
    return out


def mtp_layer_names(cfg: ModelConfig, names) -> list[str]:
    """The subset of hub `names` that belong to the MTP layers (index >= num_hidden_layers)."""
    L = cfg.num_hidden_layers
    out = []
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            if int(parts[2]) >= L:
                out.append(name)
    return out


def hub_order(maps: list[ParamMap]) -> list[tuple[str, ParamMap, tuple[int, ...]]]:
    """All hub tensors as (name, map, stack index), sorted like the hub files: embedding, then
    layer by layer (experts in order), final norm, head."""

    def key(item):
        name, pm, index = item
        if not pm.layers:
            return (0 if pm.path == ("embed",) else 2, 0, 0, 0)
        expert = index[1] if pm.num_experts else -1
        return (1, pm.layers[index[0]], expert, 0)

    items = [(name, pm, index) for pm in maps for index, name in pm.pieces()]
    order = {id(pm): i for i, pm in enumerate(maps)}
    return sorted(items, key=lambda it: key(it)[:3] + (order[id(it[1])],))


_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_fused_experts(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Rewrites transformers' in-memory fused expert tensors as the hub's per-expert ones.

    transformers 5 keeps `mlp.experts.gate_up_proj` [E, 2F, D] and `mlp.experts.down_proj`
    [E, D, F] in its modules (its `save_pretrained` still writes the per-expert hub layout, but a
    raw `state_dict()` saved with safetensors has the fused names). Expert e's gate, up and down
    projections are contiguous row ranges of those tensors, so each becomes a `TensorInfo`
    pointing at its byte range and the rest of the loader sees the hub layout.
    """
    out = {}
    for name, info in tensors.items():
        m = _FUSED.match(name)
        if m is None:
            out[name] = info
            continue
        if len(info.shape) != 3 or info.dtype not in FLOAT_CODES:
            raise CheckpointError(
                f"{info.file}: fused expert tensor {name!r} must be 3-D {FLOAT_CODES}, got "
                f"{info.dtype}{list(info.shape)}"
            )
        E, rows, cols = info.shape
        row_bytes = info.nbytes // (E * rows) if E * rows else 0
        parts = (
            (("gate_proj", 0), ("up_proj", rows // 2))
            if m["kind"] == "gate_up_proj"
            else (("down_proj", 0),)
        )
        n = rows // len(parts)
        for e in range(E):
            for proj, r0 in parts:
                new = f"{m['prefix']}.{e}.{proj}.weight"
                start = info.start + (e * rows + r0) * row_bytes
                out[new] = dataclasses.replace(
                    info, name=new, shape=(n, cols), start=start, nbytes=n * row_bytes
                )
    return out


# ---- our parameters on a mesh ----------------------------------------------------------------
# Used when a mesh is given without rules: the project's one default (sharding.rules).
DEFAULT_PARAM_RULES = RULE_PRESETS[DEFAULT_RULES]


def partition_spec(
    axes: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh_shape: Mapping[str, int],
    rules: Mapping[str, Any],
    where: str = "",
) -> PartitionSpec:
    """Logical axes of a parameter -> PartitionSpec on a mesh of `mesh_shape` (sharding/rules.py).

    Rules naming mesh axes that a partial `mesh_shape` (e.g. {"fsdp": 8}) lacks are dropped.
    """
    present = set(mesh_shape)

    def keep(target):
        names = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(n for n in names if n in present)
        return kept[0] if len(kept) == 1 else (kept or None)

    rules = {k: keep(v) for k, v in rules.items()}
    return spec_for(where, tuple(shape), axes, rules, dict(mesh_shape))


def parse_rules(text: str) -> dict[str, str | tuple[str, ...] | None]:
    """'embed=fsdp,experts=expert,vocab=' -> {'embed': 'fsdp', ..., 'vocab': None}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, target = part.partition("=")
        if not eq:
            raise ValueError(f"rules {text!r}: expected 'logical=mesh_axis[+mesh_axis],...'")
        names = tuple(filter(None, target.split("+")))
        out[name] = None if not names else names[0] if len(names) == 1 else names
    return out
