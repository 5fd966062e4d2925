"""FLOPs per token and MFU checked against a hand computation for DeepSeek-V3 671B."""

import jax
import pytest

from deepseek_jax.config import load_preset
from deepseek_jax.params import count_params
from deepseek_jax.train.flops import describe_peak, flops_per_token, mfu, peak_flops

T = 4096


@pytest.fixture(scope="module")
def v3():
    return load_preset("deepseek-v3-671b")


def test_671b_flops_per_token_by_hand(v3):
    D, V, N = 7168, 129280, 128
    # MLA per layer: wq_a D*Q, wq_b Q*N*(128+64), wkv_a D*(512+64), wkv_b 512*N*(128+128), wo.
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert mla == 187_105_280
    dense_ffn = 3 * 7168 * 18432  # 396_361_728
    moe = 7168 * 256 + (8 + 1) * 3 * 7168 * 2048  # router + 8 routed + 1 shared expert
    head = D * V
    main = 61 * mla + 3 * dense_ffn + 58 * moe + head
    assert main == 36_624_596_992
    mtp = 2 * D * D + mla + moe + head
    attn = 62 * 3 * N * T * (192 + 128)  # 61 layers + 1 MTP, causal half of 6 N T (d_qk + d_v)
    total = 6 * (main + mtp) + attn
    assert total == 260_641_652_736

    f = flops_per_token(v3, T)
    assert (f.weights_main, f.weights_mtp, f.attention, f.total) == (main, mtp, attn, total)
    # Without MTP: DeepSeek's quoted ~250 GFLOPs per training token at 4K context.
    assert flops_per_token(v3, T, include_mtp=False).total == 250_449_887_232
    # Non-causal counting doubles only the attention core.
    assert flops_per_token(v3, T, causal=False).total == total + attn


def test_weights_match_the_parameter_count(v3):
    # Activated parameters minus the embedding lookup, the norm scales (2D + Q + C per layer and
    # the final D) and the routing biases (not matmuls) are exactly the matmul weights.
    counts = count_params(v3)
    norms = 61 * (2 * 7168 + 1536 + 512) + 7168
    biases = 58 * 256
    assert counts.activated - 129280 * 7168 - norms - biases == flops_per_token(v3, T).weights_main


def test_mfu_by_hand(v3):
    f = flops_per_token(v3, T).total
    # 2048 H800s at 1.5M tokens/s: 1.5e6 * 2.606e11 / (2048 * 989e12) = 19.3%.
    assert mfu(1.5e6, f, 2048, 989e12) == pytest.approx(1.5e6 * f / (2048 * 989e12))
    assert mfu(1.5e6, f, 2048, 989e12) == pytest.approx(0.193, abs=5e-4)


def test_peak_flops_lookup():
    assert peak_flops(override=123.0) == 123.0
    cpu = jax.devices("cpu")[0]
    assert peak_flops(cpu) == describe_peak(cpu)[0]  # the machine peak (tests/train/test_mfu.py)

    class Fake:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind

    assert peak_flops(Fake("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(Fake("NVIDIA H100 PCIe")) == 756e12
    assert peak_flops(Fake("TPU v5 lite")) == 197e12
    with pytest.raises(ValueError, match="train.peak_flops"):
        peak_flops(Fake("Mystery Accelerator"))
