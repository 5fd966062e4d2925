"""DeepSeek LLM's scaling laws (arXiv 2401.02954 Sec. 3) against hand-computed values."""

import math

import pytest

from deepseek_jax import scaling
from deepseek_jax.config import load_preset
from deepseek_jax.plan import main as plan_main
from deepseek_jax.train.config import load_run_config


def test_model_scale_of_the_7b_and_67b():
    # M = 72 n_layer d^2 + 12 n_layer d l_seq at l_seq = 4096, by hand:
    # 7B:  72*30*4096^2 + 12*30*4096*4096 = 84 * 30 * 16777216 = 42,278,584,320
    # 67B: 72*95*8192^2 + 12*95*8192*4096 = 459,024,629,760 + 38,252,052,480
    assert scaling.model_scale(30, 4096, 4096) == 42_278_584_320
    assert scaling.model_scale(95, 8192, 4096) == 497_276_682_240
    # vs 6N_1 (non-embedding parameters only), M adds the attention core: 1/6 more at d = l_seq.
    assert scaling.model_scale(30, 4096, 4096) / (72 * 30 * 4096**2) == pytest.approx(7 / 6)


def test_fitted_laws_at_1e20():
    C = 1e20  # C^-0.125 = 10^-2.5, C^0.3271 = 10^6.542, C^0.5243 = 10^10.486, C^0.4757 = 10^9.514
    assert scaling.optimal_lr(C) == pytest.approx(0.3118 * 10**-2.5, rel=1e-12)
    assert scaling.optimal_lr(C) == pytest.approx(9.860e-4, rel=1e-4)
    assert scaling.optimal_batch_tokens(C) == pytest.approx(1.01714e6, rel=1e-4)
    assert scaling.optimal_model_scale(C) == pytest.approx(5.2513e9, rel=1e-4)
    assert scaling.optimal_tokens(C) == pytest.approx(1.90453e10, rel=1e-4)
    # C = M D: the allocation laws multiply back to the budget (0.1715 x 5.8316 = 1.0001).
    for c in (1e17, 1e21, 1e24):
        assert scaling.optimal_model_scale(c) * scaling.optimal_tokens(c) == pytest.approx(
            c, rel=2e-4
        )
    # Larger budgets: larger batches, smaller learning rates (Sec. 3.1).
    assert scaling.optimal_lr(1e22) < scaling.optimal_lr(1e20)
    assert scaling.optimal_batch_tokens(1e22) > scaling.optimal_batch_tokens(1e20)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan")])
def test_bad_budget_is_an_error(bad):
    with pytest.raises(ValueError, match="compute budget C="):
        scaling.optimal_lr(bad)


def test_model_scale_of_our_config_equals_eq2_for_llama_shapes():
    # MHA, SwiGLU FFN of exactly 8/3 d: 4 d^2 + 3 d F = 12 d^2 weights per layer.
    cfg = load_preset("dense-small").replace(
        hidden_size=96,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=24,
        num_hidden_layers=3,
    )
    assert scaling.model_scale_of(cfg, 128) == scaling.model_scale(3, 96, 128)


def test_plan_scaling_cli_prints_the_recommendation(capsys):
    # The budget at which M_opt is DeepSeek LLM 7B's M: (M / 0.1715)^(1 / 0.5243).
    m7 = scaling.model_scale_of(load_preset("deepseek-llm-7b"), 4096)
    C = (m7 / 0.1715) ** (1 / 0.5243)
    rec = plan_main(["--scaling", f"{C:.6e}", "--seq", "4096"])
    out = capsys.readouterr().out
    assert rec.preset == "deepseek-llm-7b"  # deepseek-math-7b has the same M; sorted first
    assert rec.model_scale == pytest.approx(m7, rel=1e-5)
    assert rec.lr == pytest.approx(scaling.optimal_lr(C))
    assert rec.batch_sequences == round(scaling.optimal_batch_tokens(C) / 4096)
    for text in ("M_opt", "D_opt", "B_opt", "eta_opt", "nearest preset: deepseek-llm-7b"):
        assert text in out
    with pytest.raises(SystemExit):
        plan_main(["--scaling", "-5"])


def test_run_config_takes_lr_batch_and_steps_from_the_laws():
    C = 3e15
    run = load_run_config(
        "configs/train-dense-small.yaml",
        [f"train.scaling_compute={C}", "train.grad_accum=2"],
    )
    T = run.data.seq_len
    assert run.train.lr == pytest.approx(scaling.optimal_lr(C))
    rows = run.data.global_batch_size
    assert rows % 2 == 0 and abs(rows * T - scaling.optimal_batch_tokens(C)) <= 2 * T
    tokens = C / scaling.model_scale_of(run.model, T)
    assert run.train.steps == max(1, round(tokens / (rows * T)))
    with pytest.raises(ValueError, match=r"TrainConfig\.scaling_compute=-1"):
        load_run_config("configs/train-dense-small.yaml", ["train.scaling_compute=-1"])
    assert math.isclose(
        load_run_config("configs/train-dense-small.yaml").train.lr, 2e-3
    )  # without the option the file's lr stands
