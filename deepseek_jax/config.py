"""Model configuration: one frozen, validated dataclass covering DeepSeek-V2, V2-Lite and V3.

Field names follow the Hugging Face `config.json` of the DeepSeek checkpoints so that a hub config
maps onto `ModelConfig` field for field; `ModelConfig.from_file` reads either such a file or one of
our YAML presets in `configs/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

import jax.numpy as jnp
import yaml

from deepseek_jax.resources import preset_dir

TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
ScoringFunc = Literal["softmax", "sigmoid"]
MoeImpl = Literal["dropless", "capacity"]
AttentionType = Literal["mla", "mha"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = ("none", "full", "dots", "dots_with_no_batch_dims")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (DeepSeek-V2 report, Appendix B; YaRN paper eq. 17-20).

    `mscale`/`mscale_all_dim` follow DeepSeek's checkpoints: cos/sin are multiplied by
    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) and the softmax scale by
    yarn_mscale(factor, mscale_all_dim)**2.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    rope_type: Literal["yarn"] = "yarn"

    def __post_init__(self):
        for f in dataclasses.fields(self):  # NaN/inf pass every `x < bound` check below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"RopeScaling.{f.name}={value!r} is invalid: must be finite")
        if self.rope_type != "yarn":
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r} is unsupported: only 'yarn'"
            )
        if self.factor < 1.0:
            raise ValueError(f"RopeScaling.factor={self.factor} must be >= 1")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("RopeScaling.original_max_position_embeddings must be positive")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"RopeScaling.beta_fast={self.beta_fast} must exceed beta_slow={self.beta_slow}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3 model (dimension letters as in README.md, Conventions)."""

    # Sizes.
    vocab_size: int = 129280  # V
    hidden_size: int = 7168  # D
    intermediate_size: int = 18432  # F of the dense layers
    moe_intermediate_size: int = 2048  # F of one routed/shared expert
    num_hidden_layers: int = 61  # L (not counting MTP modules)
    num_attention_heads: int = 128  # N
    # Attention type: "mla" (V2/V3) or "mha", standard multi-head attention (grouped-query when
    # num_key_value_heads < num_attention_heads), as in DeepSeek LLM / DeepSeekMath.
    attention_type: AttentionType = "mla"
    num_key_value_heads: int | None = None  # "mha" only; None = num_attention_heads
    head_dim: int | None = None  # "mha" only; None = hidden_size // num_attention_heads
    # MLA.
    q_lora_rank: int | None = 1536  # Q; None = no query compression (V2-Lite)
    kv_lora_rank: int = 512  # C
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # R
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True  # DeepSeek checkpoints rotate adjacent pairs
    max_position_embeddings: int = 163840
    attention_bias: bool = False
    # DeepSeekMoE.
    n_routed_experts: int | None = 256  # E; None = dense model
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # K
    n_group: int = 8  # G
    topk_group: int = 4
    topk_method: TopkMethod = "noaux_tc"
    scoring_func: ScoringFunc = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    moe_impl: MoeImpl = "dropless"
    capacity_factor: float = 1.25  # used by moe_impl="capacity"
    # V2 Sec. 2.3: tokens of ~10% of the sequences are never dropped (expert-parallel capacity).
    never_drop_share: float = 0.1
    # V2 balance losses per sequence, then averaged (DeepSeek's MoEGate with the shipped
    # config.json `seq_aux: true`); false: over the whole batch. See losses.py.
    seq_aux: bool = True
    # MTP.
    num_nextn_predict_layers: int = 1
    # Misc.
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    initializer_range: float = 0.006
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    remat: str = "full"
    # lax.scan over each stack of identical layers: the compiled program's size does not grow
    # with depth. False: a Python loop over the layers. For a few layers on XLA:CPU that is
    # faster (the scan's stacked residual buffers go away: v3-small's train step 1.14x) and
    # compiles no slower; deep models keep the scan.
    scan_layers: bool = True
    fp8: bool = False  # run linear layers / routed experts in FP8 (kernels issue)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # NaN/inf pass every `x <= 0` check below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f.name, value, "must be finite")
        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim "
            "max_position_embeddings"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "must be a positive integer")
        self._validate_attention()
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            _fail("q_lora_rank", self.q_lora_rank, "must be a positive integer or None")
        if self.attention_bias:
            _fail("attention_bias", True, "must be false: MLA has no projection biases")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
        if self.rope_theta <= 0:
            _fail("rope_theta", self.rope_theta, "must be positive")
        if self.dtype not in _DTYPES:
            _fail("dtype", self.dtype, f"allowed: {sorted(_DTYPES)}")
        if self.param_dtype not in _DTYPES:
            _fail("param_dtype", self.param_dtype, f"allowed: {sorted(_DTYPES)}")
        if self.remat not in _REMAT:
            _fail("remat", self.remat, f"allowed: {list(_REMAT)}")
        if self.hidden_act != "silu":
            _fail("hidden_act", self.hidden_act, "only 'silu' is supported")
        if self.rms_norm_eps <= 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "must be positive")
        if self.num_nextn_predict_layers < 0:
            _fail("num_nextn_predict_layers", self.num_nextn_predict_layers, "must be >= 0")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            _fail(
                "first_k_dense_replace",
                self.first_k_dense_replace,
                f"must be in [0, num_hidden_layers={self.num_hidden_layers}]",
            )
        if self.n_routed_experts is None:
            return
        E, K, G = self.n_routed_experts, self.num_experts_per_tok, self.n_group
        if E <= 0:
            _fail("n_routed_experts", E, "must be positive or None")
        if not 1 <= K <= E:
            _fail("num_experts_per_tok", K, f"must be in [1, n_routed_experts={E}]")
        if self.n_shared_experts < 0:
            _fail("n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.moe_layer_freq != 1:
            _fail(
                "moe_layer_freq",
                self.moe_layer_freq,
                "only 1 is supported (every layer after first_k_dense_replace is MoE, as in all "
                "released V2/V3 checkpoints)",
            )
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            _fail(
                "topk_method", self.topk_method, "allowed: greedy, group_limited_greedy, noaux_tc"
            )
        if self.scoring_func not in ("softmax", "sigmoid"):
            _fail("scoring_func", self.scoring_func, "allowed: softmax, sigmoid")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            _fail("scoring_func", self.scoring_func, "topk_method='noaux_tc' needs 'sigmoid'")
        if G <= 0 or E % G:
            _fail("n_group", G, f"must be positive and divide n_routed_experts={E}")
        if not 1 <= self.topk_group <= G:
            _fail("topk_group", self.topk_group, f"must be in [1, n_group={G}]")
        if self.topk_method != "greedy" and K > self.topk_group * (E // G):
            _fail(
                "num_experts_per_tok",
                K,
                f"must be <= topk_group * experts per group = {self.topk_group * (E // G)}",
            )
        if self.topk_method == "noaux_tc" and E // G < 2:
            _fail("n_group", G, "noaux_tc scores a group by its top-2 experts: need >= 2 per group")
        if self.moe_impl not in ("dropless", "capacity"):
            _fail("moe_impl", self.moe_impl, "allowed: dropless, capacity")
        if self.capacity_factor <= 0:
            _fail("capacity_factor", self.capacity_factor, "must be positive")
        if not 0 <= self.never_drop_share <= 1:
            _fail("never_drop_share", self.never_drop_share, "must be in [0, 1]")

    def _validate_attention(self) -> None:
        if self.attention_type not in ("mla", "mha"):
            _fail("attention_type", self.attention_type, "allowed: mla, mha")
        for name in ("num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "must be a positive integer or None")
            if self.attention_type == "mla" and name == "num_key_value_heads":
                if value != self.num_attention_heads:
                    _fail(name, value, "must equal num_attention_heads (or be None) with MLA")
        if self.attention_type != "mha":
            return
        N, kv = self.num_attention_heads, self.kv_heads
        if N % kv:
            _fail("num_key_value_heads", kv, f"must divide num_attention_heads={N}")
        if self.head_dim is None and self.hidden_size % N:
            _fail("head_dim", None, f"needed: hidden_size={self.hidden_size} % heads={N} != 0")
        if self.attn_head_dim % 2:
            _fail("head_dim", self.attn_head_dim, "must be even (RoPE rotates pairs)")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads of standard attention (N for MHA, fewer for GQA)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head dimension of standard attention (H)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates: MLA's decoupled rope part, or a whole standard head."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.attn_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers if not self.is_moe else self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 under YaRN (V2 report, App. B)."""
        scale = (self.qk_head_dim if self.attention_type == "mla" else self.attn_head_dim) ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- I/O -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "<dict>") -> ModelConfig:
        """Builds a config from our YAML keys or an HF `config.json` dict.

        HF-only keys that do not change the architecture are ignored; any other unknown key is an
        error naming the key and `source`.
        """
        raw = dict(raw)
        model_type = raw.pop("model_type", None)
        if model_type is not None and model_type not in ("deepseek_v2", "deepseek_v3", "llama"):
            raise ValueError(
                f"{source}: model_type={model_type!r} is unsupported "
                "(allowed: deepseek_v2, deepseek_v3, llama)"
            )
        if model_type == "llama":  # DeepSeek LLM / DeepSeekMath: LlamaForCausalLM checkpoints
            raw.update(attention_type="mha", n_routed_experts=None, num_nextn_predict_layers=0)
            raw.update(first_k_dense_replace=0)  # no MoE: every layer is dense
            raw.setdefault("rope_interleave", False)  # HF Llama rotates half-split pairs
        # Standard attention keeps the head fields that DeepSeek-V2/V3 files carry as noise.
        kept = {k: raw.pop(k) for k in ("head_dim",) if k in raw}
        for key in _HF_IGNORED:
            raw.pop(key, None)
        if raw.get("attention_type") == "mha":
            raw.update(kept)
        rope_scaling = _parse_rope(raw, source)
        if model_type is not None:  # an HF file: its dtype is the storage dtype, not ours
            raw.pop("torch_dtype", None)
            raw.pop("dtype", None)
        if "num_key_value_heads" in raw and raw.get("attention_type") != "mha":
            kv = raw.pop("num_key_value_heads")
            if kv not in (None, raw.get("num_attention_heads", kv)):
                raise ValueError(
                    f"{source}: num_key_value_heads={kv} must equal num_attention_heads in MLA"
                )
        if model_type == "deepseek_v2" and "topk_method" not in raw:
            raw["topk_method"] = "greedy"
        if model_type == "deepseek_v2" and "scoring_func" not in raw:
            raw["scoring_func"] = "softmax"
        if raw.get("topk_method") == "group_limited_greedy" and raw.get("scoring_func") is None:
            raw["scoring_func"] = "softmax"
        if model_type in ("deepseek_v2", "deepseek_v3"):
            raw.setdefault("rope_interleave", True)
            # HF files without the key have no MTP modules (V2); null groups mean one group.
            raw.setdefault("num_nextn_predict_layers", 0)
            for key in ("n_group", "topk_group"):
                if key in raw and raw[key] is None:
                    raw[key] = 1
        field_names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - field_names)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}")
        if raw.get("n_routed_experts") is None and "n_routed_experts" in raw:
            raw["n_routed_experts"] = None
        return cls(**raw, rope_scaling=rope_scaling)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads a YAML preset (`configs/*.yaml`, optionally under a `model:` key) or HF JSON."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model config file not found: {path}")
        with open(path) as f:
            raw = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        if "model" in raw and isinstance(raw["model"], dict):
            raw = raw["model"]
        return cls.from_dict(raw, source=path)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.rope_scaling is None:
            out["rope_scaling"] = None
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """The hub-style `config.json` for this architecture (for export)."""
        if self.attention_type == "mha" and not self.is_moe:
            return self._to_llama_dict()
        out = {
            k: v
            for k, v in self.to_dict().items()
            if k
            not in (
                "dtype",
                "param_dtype",
                "remat",
                "scan_layers",
                "fp8",
                "moe_impl",
                "capacity_factor",
                "never_drop_share",
            )
        }
        if self.attention_type == "mla":
            # MLA's hub configs carry no head_dim: transformers derives its rotary width from
            # qk_rope_head_dim, and an explicit null breaks it (transformers 5.25)
            out.pop("head_dim", None)
        v3 = self.topk_method == "noaux_tc"
        out["model_type"] = "deepseek_v3" if v3 else "deepseek_v2"
        out["architectures"] = ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"]
        out["num_key_value_heads"] = self.num_attention_heads
        if self.rope_scaling is not None:
            rs = dict(dataclasses.asdict(self.rope_scaling))
            rs["type"] = rs.pop("rope_type")
            out["rope_scaling"] = rs
        return out

    def _to_llama_dict(self) -> dict[str, Any]:
        """A dense standard-attention model as the `LlamaForCausalLM` config.json DeepSeek LLM
        ships (HF Llama rotates half-split pairs: exportable only with rope_interleave=False)."""
        if self.rope_interleave or self.rope_scaling is not None or self.num_nextn_predict_layers:
            raise ValueError(
                "ModelConfig.attention_type='mha' exports as model_type 'llama', which needs "
                "rope_interleave=False, rope_scaling=None and num_nextn_predict_layers=0; got "
                f"{self.rope_interleave}, {self.rope_scaling}, {self.num_nextn_predict_layers}"
            )
        keys = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "rope_theta max_position_embeddings attention_bias rms_norm_eps "
            "tie_word_embeddings hidden_act initializer_range"
        ).split()
        out = {k: getattr(self, k) for k in keys}
        out.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            num_key_value_heads=self.kv_heads,
            head_dim=self.attn_head_dim,
            rope_scaling=None,
            mlp_bias=False,
        )
        return out


# Keys of HF configs that carry no architecture for us (training-time knobs, token ids, ...).
_HF_IGNORED = (
    "architectures",
    "auto_map",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "attention_dropout",
    "pretraining_tp",
    "quantization_config",
    "aux_loss_alpha",
    "ep_size",
    "output_router_logits",
    "router_aux_loss_coef",
    "_name_or_path",
    "mlp_bias",
    "qk_head_dim",
    "num_experts",
    "num_local_experts",
    "partial_rotary_factor",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
)


def _parse_rope(raw: dict[str, Any], source: str) -> RopeScaling | None:
    """Accepts hub style (`rope_theta` + `rope_scaling`) and newer `rope_parameters`."""
    params = raw.pop("rope_parameters", None)
    scaling = raw.pop("rope_scaling", None)
    if params is not None:
        params = dict(params)
        if "rope_theta" in params:
            raw.setdefault("rope_theta", params.pop("rope_theta"))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            scaling = params
    if scaling is None:
        return None
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", scaling.pop("type", "yarn"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"{source}: rope scaling type {kind!r} is unsupported (only 'yarn')")
    known = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    extra = sorted(set(scaling) - known - {"attention_factor", "truncate"})
    if extra:
        raise ValueError(f"{source}: unknown rope_scaling key(s) {extra}")
    if scaling.get("attention_factor") is not None:
        raise ValueError(f"{source}: rope_scaling.attention_factor is unsupported; use mscale")
    if scaling.get("truncate", True) is not True:
        raise ValueError(f"{source}: rope_scaling.truncate=False is unsupported")
    kwargs = {k: v for k, v in scaling.items() if k in known and v is not None}
    if "original_max_position_embeddings" not in kwargs:
        raise ValueError(f"{source}: rope_scaling needs original_max_position_embeddings")
    return RopeScaling(**kwargs)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# configs/ in the repository, installed as the package deepseek_jax.presets.
PRESET_DIR = str(preset_dir())


def load_preset(name: str) -> ModelConfig:
    """Loads the preset `configs/<name>.yaml` (e.g. 'deepseek-v3-671b', 'v3-small')."""
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        names = sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
        raise ValueError(f"unknown preset {name!r}; available: {names}")
    return ModelConfig.from_file(path)
