"""CWM model: architecture config, execution policy, layers and the decoder."""

from cwm_jax.model.config import ModelConfig, RopeScaling, cwm_32b, meta_layer_windows, preset, tiny
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import Transformer, abstract_model, init_model, model_from_params

__all__ = [
  "Execution",
  "ModelConfig",
  "RopeScaling",
  "Transformer",
  "abstract_model",
  "cwm_32b",
  "init_model",
  "meta_layer_windows",
  "model_from_params",
  "preset",
  "tiny",
]
