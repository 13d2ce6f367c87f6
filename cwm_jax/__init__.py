"""cwm_jax: a JAX/Flax NNX training system for Meta FAIR's Code World Model."""

__version__ = "0.1.0"
