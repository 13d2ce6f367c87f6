"""CWM model: architecture config, execution policy, layers and the decoder.

The config names import without jax; the module classes load on first use, so
light processes (data workers, sandboxes) can import the configs cheaply.
"""

from cwm_jax.model.config import (ModelConfig, RopeScaling, cwm_32b, meta_layer_windows, preset,
                                  tiny)
from cwm_jax.model.execution import Execution

_LAZY = ("Transformer", "abstract_model", "init_model", "model_from_params")

__all__ = ["Execution", "ModelConfig", "RopeScaling", "cwm_32b", "meta_layer_windows", "preset",
           "tiny", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    from cwm_jax.model import transformer
    return getattr(transformer, name)
  raise AttributeError(f"module 'cwm_jax.model' has no attribute {name!r}")
