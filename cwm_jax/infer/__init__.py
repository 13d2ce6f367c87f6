"""cwm_jax.infer."""
