"""Load a model from any checkpoint directory the project understands."""

from __future__ import annotations

import os
from typing import Any

from cwm_jax.model.config import ConfigError, ModelConfig
from cwm_jax.model.transformer import Transformer, model_from_params


def detect_format(directory: str) -> str:
  """'hf' (config.json + safetensors), 'orbax' (a training workdir or checkpoints dir), 'meta'."""
  if not os.path.isdir(directory):
    raise ConfigError(f"checkpoint directory {directory!r} does not exist")
  names = set(os.listdir(directory))
  if "config.json" in names and any(n.endswith(".safetensors") for n in names):
    return "hf"
  if "params.json" in names and (".metadata" in names or any(n.endswith(".distcp") for n in names)):
    return "meta"
  if "checkpoints" in names or any(n.isdigit() for n in names):
    return "orbax"
  raise ConfigError(f"{directory!r} is not a Hugging Face (config.json + *.safetensors), Meta "
                    "(params.json + DCP) or orbax (checkpoints/<step>/) checkpoint")


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
  from cwm_jax.checkpoint import manager
  cfg, params = manager.restore_params(directory, step=step)
  return (cfg.replace(**overrides) if overrides else cfg), params


def load_model(directory: str, step: int | None = None, **overrides: Any
               ) -> tuple[ModelConfig, Transformer]:
  cfg, params = load_params(directory, step, **overrides)
  return cfg, model_from_params(cfg, params)
