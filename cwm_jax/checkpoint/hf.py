"""Hugging Face CWM checkpoints: config.json <-> ModelConfig, safetensors -> params."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open

from cwm_jax.checkpoint.names import HF, external_names
from cwm_jax.model.config import ConfigError, ModelConfig, RopeScaling

FULL, SLIDING = "full_attention", "sliding_attention"


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from a config.json dict; `layer_types` is copied verbatim."""
  n_layers = hf["num_hidden_layers"]
  global_window = int(hf.get("max_position_embeddings", 131072))
  sliding = hf.get("sliding_window") or global_window
  types = hf.get("layer_types") or [FULL if i % 4 == 0 else SLIDING for i in range(n_layers)]
  unknown = sorted(set(types) - {FULL, SLIDING})
  if unknown:
    raise ConfigError(f"config.json layer_types has unknown kinds {unknown}; "
                      f"expected {FULL!r} or {SLIDING!r}")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e6)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("llama3", "default"):
    raise ConfigError(f"unsupported rope_type {kind!r}; CWM uses 'llama3'")
  scaling = None
  if kind == "llama3":
    scaling = RopeScaling(factor=float(rope["factor"]),
                          low_freq_factor=float(rope["low_freq_factor"]),
                          high_freq_factor=float(rope["high_freq_factor"]),
                          original_context=int(rope["original_max_position_embeddings"]))
  n_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      ffn_dim=hf["intermediate_size"], global_window=global_window,
      layer_windows=tuple(global_window if t == FULL else int(sliding) for t in types),
      norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=theta, rope_scaling=scaling,
      max_seq_len=global_window)
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16", **token_ids: Any) -> dict[str, Any]:
  """config.json dict for `CwmForCausalLM`, with the explicit per-layer pattern."""
  local = sorted({w for w in cfg.layer_windows if w < cfg.global_window})
  if len(local) > 1:
    raise ConfigError(f"Hugging Face CWM has one sliding_window; this model has {local}")
  rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_context)
  out = {
      "architectures": ["CwmForCausalLM"], "model_type": "cwm",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.global_window,
      "sliding_window": local[0] if local else cfg.global_window,
      "layer_types": [FULL if w >= cfg.global_window else SLIDING for w in cfg.layer_windows],
      "rope_parameters": rope, "tie_word_embeddings": False, "dtype": dtype,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
  }
  out.update(token_ids)
  return out


class SafetensorsReader:
  """Lazy access to the tensors of one or many safetensors files."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    else:
      files = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
      weight_map = {}
      for fname in files:
        with safe_open(os.path.join(directory, fname), framework="numpy") as f:
          weight_map.update({k: fname for k in f.keys()})
    self.directory, self.weight_map = directory, weight_map

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def get(self, name: str) -> np.ndarray:
    """One tensor as numpy; bfloat16 arrives as ml_dtypes.bfloat16."""
    path = os.path.join(self.directory, self.weight_map[name])
    with safe_open(path, framework="numpy") as f:
      return f.get_tensor(name)


def load_hf(directory: str, **overrides: Any) -> tuple[ModelConfig, dict]:
  """Reads a Hugging Face CWM directory into (config, nested numpy params)."""
  with open(os.path.join(directory, "config.json")) as f:
    cfg = config_from_hf(json.load(f), **overrides)
  reader = SafetensorsReader(directory)
  expected, present = set(external_names(HF, cfg)), set(reader.names())
  if expected - present or present - expected:
    raise ConfigError(f"{directory}: tensors missing {sorted(expected - present)[:5]}, "
                      f"unexpected {sorted(present - expected)[:5]}; is this a CWM checkpoint?")
  params: dict = {}
  for e in HF:
    if e.stacked:
      value = np.stack([e.to_ours(reader.get(e.theirs.format(i=i)), cfg)
                        for i in range(cfg.n_layers)])
    else:
      value = e.to_ours(reader.get(e.theirs), cfg)
    node = params
    for key in e.ours[:-1]:
      node = node.setdefault(key, {})
    node[e.ours[-1]] = value
  return cfg, params
