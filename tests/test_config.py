import json

import pytest

from deepseek_jax.config import ModelConfig, RopeScaling, load_preset

PRESETS = [
    "deepseek-v3-671b",
    "deepseek-v2-236b",
    "deepseek-v2-lite-16b",
    "v3-small",
    "v3-tiny",
    "v3-1b",
]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_preset(name)
    assert cfg.num_dense_layers + cfg.num_moe_layers == cfg.num_hidden_layers


def test_v3_preset_facts():
    cfg = load_preset("deepseek-v3-671b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts) == (7168, 61, 256)
    assert cfg.rope_scaling == RopeScaling(40, 4096, 32, 1, 1.0, 1.0)
    # softmax scale = mscale(40)^2 / sqrt(192), mscale = 0.1 ln 40 + 1
    import math

    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(m * m / math.sqrt(192))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(topk_group=5), "topk_group"),
        (dict(n_group=3), "n_group"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(topk_method="top1"), "topk_method"),
        (dict(scoring_func="softmax"), "scoring_func"),  # noaux_tc needs sigmoid
        (dict(first_k_dense_replace=99), "first_k_dense_replace"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(dtype="int8"), "dtype"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (dict(remat="sometimes"), "remat"),
    ],
)
def test_invalid_config_names_field(change, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        load_preset("v3-tiny").replace(**change)


def _hf_v3(**extra):
    base = dict(
        model_type="deepseek_v3",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        num_nextn_predict_layers=1,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        torch_dtype="bfloat16",
        bos_token_id=0,
        eos_token_id=1,
        architectures=["DeepseekV3ForCausalLM"],
        quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
    )
    base.update(extra)
    return base


def test_hf_config_hub_style(tmp_path):
    raw = _hf_v3(
        rope_theta=10000,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    cfg = ModelConfig.from_file(path)
    assert cfg.rope_scaling.factor == 40 and cfg.rope_interleave
    assert cfg.dtype == "bfloat16"  # our default compute dtype, not the checkpoint's storage


def test_hf_config_rope_parameters_style(tmp_path):
    raw = _hf_v3(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 5000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        }
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    cfg = ModelConfig.from_file(path)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling.mscale == 0.707


def test_hf_config_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf_v3(model_type="mistral")))
    with pytest.raises(ValueError, match="model_type='mistral'"):
        ModelConfig.from_file(path)
    path.write_text(json.dumps(_hf_v3(bogus_key=1)))
    with pytest.raises(ValueError, match="bogus_key"):
        ModelConfig.from_file(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ModelConfig.from_file(tmp_path / "nope.json")


def test_v2_defaults_from_hf():
    # A deepseek_v2 config.json without topk_method, scoring_func or the MTP count gets V2's
    # defaults (greedy softmax routing, no MTP modules), not the V3 ones of the base dict.
    raw = _hf_v3(model_type="deepseek_v2", n_group=1, topk_group=1)
    for key in ("topk_method", "scoring_func", "num_nextn_predict_layers"):
        del raw[key]
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.topk_method, cfg.scoring_func) == ("greedy", "softmax")
    assert cfg.num_nextn_predict_layers == 0


def test_yaml_roundtrip(tmp_path):
    import yaml

    cfg = load_preset("deepseek-v2-lite-16b")
    assert cfg.q_lora_rank is None
    path = tmp_path / "c.yaml"
    d = cfg.to_dict()
    d["rope_scaling"] = {
        "type": "yarn",
        **{k: v for k, v in d["rope_scaling"].items() if k != "rope_type"},
    }
    path.write_text(yaml.safe_dump({"model": d}))
    assert ModelConfig.from_file(path) == cfg
