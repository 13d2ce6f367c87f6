"""The one checkpoint reader: any format, fully validated, into a model.

Every load (`score`, `sample`, `evaluate`, `predict_trace`, the finish step,
conversion) opens the checkpoint through `conversion.open_source`, which
checks the config and every tensor's name, shape and dtype against it before
a byte of tensor data is read; tensors are then read one at a time
(tensorstore for orbax, safetensors, DCP), and any corruption is a
`ConfigError` naming the file.
"""

from __future__ import annotations

import numpy as np

from cwm_jax.checkpoint.conversion import expected_shapes, open_source
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import Transformer, model_from_params


def load_params(directory: str, step: int | None = None) -> tuple[ModelConfig, dict]:
  """(architecture, nested numpy param dict in our layout) of a HF, Meta or orbax checkpoint."""
  src = open_source(directory, step)
  params: dict = {}
  for path, shape in expected_shapes(src.cfg).items():
    stacked = path[0] == "layers" and src.fmt != "orbax"  # orbax leaves are stored stacked
    value = (
      np.stack([src.read(path, i) for i in range(shape[0])]) if stacked else src.read(path, None)
    )
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return src.cfg, params


def load_model(
  directory: str, step: int | None = None, execution: Execution = Execution()
) -> tuple[ModelConfig, Transformer]:
  """(architecture, model) from a checkpoint, run with `execution`."""
  cfg, params = load_params(directory, step)
  return cfg, model_from_params(cfg, params, execution)
