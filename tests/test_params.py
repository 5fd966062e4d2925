"""Full-size configs through nnx.eval_shape: the report's parameter counts at zero memory."""

import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.params import count_params


@pytest.mark.parametrize(
    "name, total_b, activated_b",
    [
        ("deepseek-v3-671b", 671, 37),  # V3 report: 671B total, 37B activated
        ("deepseek-v2-236b", 236, 21),  # V2 report: 236B total, 21B activated
        ("deepseek-v2-lite-16b", 15.7, 2.4),  # V2-Lite: 15.7B total, 2.4B activated
    ],
)
def test_report_counts(name, total_b, activated_b):
    cfg = load_preset(name)
    c = count_params(cfg)
    assert c.total / 1e9 == pytest.approx(total_b, rel=0.003)
    # Activated counts every non-routed parameter once (embedding and head included), which puts
    # V3 at 37.55B; the reports round (V2-Lite's 2.4B excludes the 0.21B input embedding).
    embed = cfg.vocab_size * cfg.hidden_size
    assert activated_b * 1e9 <= c.activated + (embed if name.endswith("lite-16b") else 0)
    assert c.activated - (embed if name.endswith("lite-16b") else 0) < (activated_b + 0.6) * 1e9


def test_v3_exact_breakdown():
    cfg = load_preset("deepseek-v3-671b")
    c = count_params(cfg)
    # Hand count: one routed expert is 3 * 7168 * 2048 weights; 58 MoE layers x 256 experts.
    assert c.routed_expert == 58 * 256 * 3 * 7168 * 2048
    assert c.total - c.activated == 58 * (256 - 8) * 3 * 7168 * 2048
    D, V, N, Q, C, R = 7168, 129280, 128, 1536, 512, 64
    mla = D * Q + Q + Q * N * 192 + D * (C + R) + C + C * N * 256 + N * 128 * D + 2 * D
    dense = 3 * D * 18432
    moe = D * 256 + 256 + 3 * 256 * D * 2048 + 3 * D * 2048
    assert c.total == 2 * V * D + D + 61 * mla + 3 * dense + 58 * moe
    assert c.mtp > 0  # the MTP module is counted separately (the hub checkpoint's extra weights)
