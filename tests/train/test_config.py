"""Run config: YAML + key=value overrides, with errors that name the key and allowed values."""

import pytest

from deepseek_jax.train.config import DEFAULT_RUN_CONFIG, RunConfig, TrainConfig, load_run_config


def test_default_run_config_is_the_small_v3():
    cfg = load_run_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.hidden_size == 256 and cfg.model.num_nextn_predict_layers == 1
    assert cfg.model.topk_method == "noaux_tc" and cfg.model.q_lora_rank is not None
    assert cfg.data.seq_len == 256 and cfg.data.global_batch_size == 8


def test_overrides_are_typed_and_nested():
    cfg = load_run_config(
        None,
        [
            "train.steps=100",
            "train.lr=1e-4",  # YAML 1.1 reads this as a string: converted to float
            "model.num_hidden_layers=2",
            "mesh.fsdp=8",
            "data.tokenizer=null",
            "train.step_boundaries=[0.5, 0.75]",
            "train.step_factors=[0.5, 0.25]",
            "model.preset=v3-tiny",
            "model.rope_scaling.factor=8",
        ],
    )
    assert cfg.train.steps == 100 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.num_hidden_layers == 2 and cfg.mesh.fsdp == 8
    assert cfg.data.tokenizer is None
    assert cfg.train.step_boundaries == (0.5, 0.75)
    # The preset's other YaRN fields survive a nested override of one of them.
    assert cfg.model.rope_scaling.factor == 8
    assert cfg.model.rope_scaling.original_max_position_embeddings == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("optim.lr=3", "unknown section 'optim'"),
        ("model.hidden=3", "model.hidden"),
        ("steps=3", "section.field"),
        ("train.steps", "section.field=value"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.schedule=linear", r"train.schedule='linear'.*\['v3', 'multistep'"),
        ("train.steps=ten", r"train.steps='ten'.*int"),
        ("model.dtype=fp8", r"ModelConfig.dtype='fp8'.*bfloat16"),
        ("train.mu_dtype=float16", r"train.mu_dtype.*\['float32', 'bfloat16'\]"),
        ("train.grad_accum=3", r"global_batch_size=8 must be a multiple of train.grad_accum=3"),
        ("mesh.data=0", r"MeshConfig.data=0"),
        ("model.preset=v9", r"model.preset='v9' is unknown"),
    ],
)
def test_bad_values_name_field_and_allowed_values(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [override])


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 5\n  lr_max: 1.0\n")
    with pytest.raises(ValueError, match=r"run.yaml.*train.lr_max"):
        load_run_config(str(path))
    path.write_text("trainer:\n  steps: 5\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainer'\]"):
        load_run_config(str(path))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = load_run_config(None, ["train.steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_run_config(str(path))
    assert again == cfg
    assert DEFAULT_RUN_CONFIG.endswith("train-v3-small.yaml")


def test_train_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="step_factors"):
        TrainConfig(step_boundaries=(0.8,), step_factors=(0.3, 0.1))


def test_a_shipped_run_config_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here (as after `pip install deepseek-jax`)
    cfg = load_run_config("train-sft-small")
    assert cfg.train.task == "sft" and cfg == load_run_config("train-sft-small.yaml")
    with pytest.raises(FileNotFoundError, match="train-nope.*shipped run configs"):
        load_run_config("train-nope")
