"""CWM model: configuration, layers and the decoder."""

from cwm_jax.model.config import (ConfigError, ModelConfig, RopeScaling, cwm_32b, meta_layer_windows,
                                  preset, tiny)
from cwm_jax.model.transformer import Transformer, abstract_model, init_model, model_from_params

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "Transformer", "abstract_model", "cwm_32b", "init_model", "model_from_params",
           "meta_layer_windows", "preset", "tiny"]
