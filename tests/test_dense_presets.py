"""DeepSeek LLM / DeepSeekMath presets: parameter counts at zero memory, and the 67B planned on an
abstract mesh through the planner."""

import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.params import count_params
from deepseek_jax.plan import main as plan_main


@pytest.mark.parametrize(
    "name, total",
    [
        # Hand count: 2 V D + D + L (4 D^2 + 3 D F + 2 D), V 102400, D 4096, F 11008, L 30.
        (
            "deepseek-llm-7b",
            2 * 102400 * 4096 + 4096 + 30 * (4 * 4096**2 + 3 * 4096 * 11008 + 8192),
        ),
        ("deepseek-math-7b", 6_910_365_696),
        # GQA: q and o are D x D, k and v D x (8 x 128) each.
        (
            "deepseek-llm-67b",
            2 * 102400 * 8192
            + 8192
            + 95 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 22016 + 2 * 8192),
        ),
    ],
)
def test_counts(name, total):
    c = count_params(load_preset(name))
    assert c.total == c.activated == total and c.mtp == 0
    assert c.total / 1e9 == pytest.approx(67.4 if "67b" in name else 6.9, abs=0.05)


def test_67b_lowers_on_an_abstract_mesh(capsys):
    argv = "--config deepseek-llm-67b --mesh fsdp=16,tensor=8 --rules fsdp_ep_tp --seq 512"
    plan = plan_main(argv.split())
    out = capsys.readouterr().out
    for row in ("parameters (fp32 master)", "optimizer state", "activations", "total"):
        assert row in out
    assert plan.mesh == {"data": 1, "fsdp": 16, "expert": 1, "tensor": 8, "stage": 1}
    # Every matrix is split 128 ways (embed over fsdp, heads / kv_heads / mlp / vocab over
    # tensor); only the norms (~1.6M values) stay whole.
    n = count_params(load_preset("deepseek-llm-67b")).total
    assert plan.param_bytes == pytest.approx(4 * n / 128, rel=1e-3)
    assert "tensor-parallel all-reduce" in plan.collectives
    print(out)
