"""cwm_jax.rl."""
