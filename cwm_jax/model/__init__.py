"""CWM model: configuration, layers and the decoder.

The config names import without jax; the module classes load on first use, so
light processes (data workers, sandboxes) can use `ConfigError` cheaply.
"""

from cwm_jax.model.config import (ConfigError, ModelConfig, RopeScaling, cwm_32b, meta_layer_windows,
                                  preset, tiny)

_LAZY = ("Transformer", "abstract_model", "init_model", "model_from_params")

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "cwm_32b", "meta_layer_windows", "preset",
           "tiny", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    from cwm_jax.model import transformer
    return getattr(transformer, name)
  raise AttributeError(f"module 'cwm_jax.model' has no attribute {name!r}")
