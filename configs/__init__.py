"""YAML presets (`deepseek_jax.presets`, read through `deepseek_jax.resources`)."""
