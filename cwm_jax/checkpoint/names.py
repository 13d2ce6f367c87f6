"""Declarative name maps between our parameter tree and released formats.

Each entry maps one of our parameter paths (layer tensors stacked on a
leading L axis) to an external name and a per-tensor transform. Transforms
are pure numpy functions with exact inverses, applied one tensor at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cwm_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: tuple[str, ...]          # path in the nnx state, e.g. ('layers', 'mlp', 'w1')
  theirs: str                    # external name; '{i}' is the layer index for stacked tensors
  to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
  to_theirs: Callable[[np.ndarray, ModelConfig], np.ndarray]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.theirs


def _same(w, cfg):
  return w


def _t(w, cfg):
  return np.ascontiguousarray(w.T)


def _in_heads(n_attr):
  """[n*H, D] (torch Linear, out x in) <-> [D, n, H]."""
  def to_ours(w, cfg):
    return np.ascontiguousarray(w.T.reshape(cfg.dim, getattr(cfg, n_attr), cfg.head_dim))

  def to_theirs(w, cfg):
    return np.ascontiguousarray(w.reshape(cfg.dim, -1).T)
  return to_ours, to_theirs


def _out_heads_to_ours(w, cfg):
  return np.ascontiguousarray(w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim))


def _out_heads_to_theirs(w, cfg):
  return np.ascontiguousarray(w.reshape(-1, cfg.dim).T)


_Q = _in_heads("n_heads")
_KV = _in_heads("n_kv_heads")

HF = (
    Entry(("embed", "embedding"), "model.embed_tokens.weight", _same, _same),
    Entry(("norm", "scale"), "model.norm.weight", _same, _same),
    Entry(("lm_head",), "lm_head.weight", _t, _t),
    Entry(("layers", "attention_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
          _same, _same),
    Entry(("layers", "ffn_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
          _same, _same),
    Entry(("layers", "attention", "wq"), "model.layers.{i}.self_attn.q_proj.weight", *_Q),
    Entry(("layers", "attention", "wk"), "model.layers.{i}.self_attn.k_proj.weight", *_KV),
    Entry(("layers", "attention", "wv"), "model.layers.{i}.self_attn.v_proj.weight", *_KV),
    Entry(("layers", "attention", "wo"), "model.layers.{i}.self_attn.o_proj.weight",
          _out_heads_to_ours, _out_heads_to_theirs),
    Entry(("layers", "mlp", "w1"), "model.layers.{i}.mlp.gate_proj.weight", _t, _t),
    Entry(("layers", "mlp", "w3"), "model.layers.{i}.mlp.up_proj.weight", _t, _t),
    Entry(("layers", "mlp", "w2"), "model.layers.{i}.mlp.down_proj.weight", _t, _t),
)


def external_names(entries, cfg: ModelConfig) -> list[str]:
  """Every external tensor name a checkpoint of `cfg` must hold."""
  names = []
  for e in entries:
    names += [e.theirs.format(i=i) for i in range(cfg.n_layers)] if e.stacked else [e.theirs]
  return names
