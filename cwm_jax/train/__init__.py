"""cwm_jax.train."""
