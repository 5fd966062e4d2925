"""Rows the dropless expert-parallel dispatch sends per token: one per (token, device) pair.

`moe.expert_parallel.token_device_pairs` groups a token's K assignments by the device that holds
their experts; the dropless ragged exchange sends one row per group each way (dispatch and
combine), where one row per assignment would be K. This counts the pairs for the presets'
routers (group-limited top-K on the real E, K, n_group and topk_group) over random router logits
(an untrained router: no learned affinity for co-located experts), for a range of EP sizes.
Nothing runs on a mesh: it is the routing arithmetic the exchange's plan is built from.

    python bench/ep_dispatch_rows.py
    python bench/ep_dispatch_rows.py --tokens 65536 --presets deepseek-v3-671b
"""

from __future__ import annotations

import argparse

from deepseek_jax.config import load_preset
from deepseek_jax.moe.expert_parallel import mean_device_pairs

PRESETS = ("deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b")
EP_SIZES = (8, 16, 32, 64)


def rows_per_token(preset: str, tokens: int, seed: int) -> dict[int, float]:
    """{EP size: mean (token, device) pairs per token} for `preset`'s router."""
    cfg = load_preset(preset)
    return {
        ep: mean_device_pairs(cfg, ep, tokens, seed)
        for ep in EP_SIZES
        if cfg.n_routed_experts % ep == 0
    }


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = parser.parse_args(argv)
    head = "| preset | E | K | groups / kept | " + " | ".join(f"EP{p}" for p in EP_SIZES) + " |"
    lines = [head, "|" + "---|" * (4 + len(EP_SIZES))]
    for name in args.presets:
        cfg = load_preset(name)
        K = cfg.num_experts_per_tok
        rows = rows_per_token(name, args.tokens, args.seed)
        cells = [
            f"{rows[p]:.2f} ({K / rows[p]:.2f}x fewer)" if p in rows else "-" for p in EP_SIZES
        ]
        lines.append(
            f"| {name} | {cfg.n_routed_experts} | {K} | {cfg.n_group} / {cfg.topk_group} | "
            + " | ".join(cells)
            + " |"
        )
    table = "\n".join(lines)
    print(f"rows per token each way (one per assignment: K); {args.tokens} tokens\n\n{table}")
    return table


if __name__ == "__main__":
    main()
