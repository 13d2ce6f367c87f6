"""Load a model from any checkpoint directory the project understands."""

from __future__ import annotations

from typing import Any

from cwm_jax.checkpoint.conversion import detect_format
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import Transformer, model_from_params


def load_params(directory: str, step: int | None = None, **overrides: Any
                ) -> tuple[ModelConfig, dict]:
  """(config, nested param dict) from a HF, Meta or orbax checkpoint."""
  fmt = detect_format(directory)
  if fmt == "hf":
    from cwm_jax.checkpoint.hf import load_hf
    return load_hf(directory, **overrides)
  if fmt == "meta":
    from cwm_jax.checkpoint import meta
    return meta.load_meta(directory, **overrides)
  from cwm_jax.checkpoint import _orbax_io, manager
  cfg, params = manager.restore_params(_orbax_io.checkpoints_dir(directory), step=step)
  return (cfg.replace(**overrides) if overrides else cfg), params


def load_model(directory: str, step: int | None = None, execution: Execution = Execution(),
               **overrides: Any) -> tuple[ModelConfig, Transformer]:
  """(architecture, model) from a checkpoint, run with `execution`."""
  cfg, params = load_params(directory, step, **overrides)
  return cfg, model_from_params(cfg, params, execution)
