"""cwm_jax.data."""
