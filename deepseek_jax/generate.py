"""`python -m deepseek_jax.generate --checkpoint PATH --prompt "..."` (see inference/cli.py).

The engine lives in `deepseek_jax.inference`; `deepseek_jax.generate(...)` is its entry point.
"""

from deepseek_jax.inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
