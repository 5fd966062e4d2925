"""Shipped tokenizer and corpus (`deepseek_jax.assets`, read through `deepseek_jax.resources`)."""
