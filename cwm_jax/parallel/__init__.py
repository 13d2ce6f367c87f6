"""cwm_jax.parallel."""
