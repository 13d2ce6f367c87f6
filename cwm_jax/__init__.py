"""cwm_jax: a JAX/Flax NNX training system for Meta FAIR's Code World Model."""

from cwm_jax import storage as _storage

__version__ = "0.1.0"

# Before any gs:// client reads its settings: one emulator variable drives them all.
_storage.configure_environment()
