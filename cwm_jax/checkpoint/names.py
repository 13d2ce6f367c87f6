"""Declarative name maps between our parameter tree and released formats.

Each entry maps one of our parameter paths (layer tensors stacked on a
leading L axis) to an external name, a per-tensor transform pair with exact
inverses, and the external shape. Transforms are pure numpy, applied one
tensor (one layer) at a time.

Layouts: Hugging Face stores torch Linear weights [out, in] with RoPE pairs
(i, i + H/2) ("rotate-half"), as our model does. Meta stores the same
[out, in] weights but wq/wk rows in RoPE pairs (2i, 2i + 1) ("interleaved");
`interleaved_to_half` / `half_to_interleaved` permute those rows per head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from cwm_jax.model.config import ModelConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: tuple[str, ...]  # path in the nnx state, e.g. ('layers', 'mlp', 'w1')
  theirs: str  # external name; '{i}' is the layer index for stacked tensors
  to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
  to_theirs: Callable[[np.ndarray, ModelConfig], np.ndarray]
  shape: Callable[[ModelConfig], Shape] | None = None  # external shape of one tensor

  @property
  def stacked(self) -> bool:
    return "{i}" in self.theirs

  def names(self, cfg: ModelConfig) -> list[str]:
    return [self.theirs.format(i=i) for i in range(cfg.n_layers)] if self.stacked else [self.theirs]


def interleaved_to_half(w: np.ndarray) -> np.ndarray:
  """Last axis (one head, H) from RoPE pairs (2i, 2i+1) to pairs (i, i+H/2)."""
  *lead, h = w.shape
  return np.ascontiguousarray(w.reshape(*lead, h // 2, 2).swapaxes(-1, -2).reshape(*lead, h))


def half_to_interleaved(w: np.ndarray) -> np.ndarray:
  """Inverse of `interleaved_to_half`."""
  *lead, h = w.shape
  return np.ascontiguousarray(w.reshape(*lead, 2, h // 2).swapaxes(-1, -2).reshape(*lead, h))


def _same(w, cfg):
  return w


def _t(w, cfg):
  return np.ascontiguousarray(w.T)


def _in_heads(n_attr, rope_interleaved=False):
  """[n*H, D] (torch Linear, out x in) <-> [D, n, H]; optionally RoPE rows permuted."""

  def to_ours(w, cfg):
    w_DnH = w.T.reshape(cfg.dim, getattr(cfg, n_attr), cfg.head_dim)
    return interleaved_to_half(w_DnH) if rope_interleaved else np.ascontiguousarray(w_DnH)

  def to_theirs(w, cfg):
    if rope_interleaved:
      w = half_to_interleaved(w)
    return np.ascontiguousarray(w.reshape(cfg.dim, -1).T)

  return to_ours, to_theirs


def _out_heads_to_ours(w, cfg):
  return np.ascontiguousarray(w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim))


def _out_heads_to_theirs(w, cfg):
  return np.ascontiguousarray(w.reshape(-1, cfg.dim).T)


def _vd(c):
  return (c.vocab_size, c.dim)


def _d(c):
  return (c.dim,)


def _qd(c):
  return (c.n_heads * c.head_dim, c.dim)


def _kd(c):
  return (c.n_kv_heads * c.head_dim, c.dim)


def _dq(c):
  return (c.dim, c.n_heads * c.head_dim)


def _fd(c):
  return (c.ffn_dim, c.dim)


def _df(c):
  return (c.dim, c.ffn_dim)


_Q = _in_heads("n_heads")
_KV = _in_heads("n_kv_heads")
_OUT = (_out_heads_to_ours, _out_heads_to_theirs)

HF = (
  Entry(("embed", "embedding"), "model.embed_tokens.weight", _same, _same, _vd),
  Entry(("norm", "scale"), "model.norm.weight", _same, _same, _d),
  Entry(("lm_head",), "lm_head.weight", _t, _t, _vd),
  Entry(
    ("layers", "attention_norm", "scale"),
    "model.layers.{i}.input_layernorm.weight",
    _same,
    _same,
    _d,
  ),
  Entry(
    ("layers", "ffn_norm", "scale"),
    "model.layers.{i}.post_attention_layernorm.weight",
    _same,
    _same,
    _d,
  ),
  Entry(("layers", "attention", "wq"), "model.layers.{i}.self_attn.q_proj.weight", *_Q, _qd),
  Entry(("layers", "attention", "wk"), "model.layers.{i}.self_attn.k_proj.weight", *_KV, _kd),
  Entry(("layers", "attention", "wv"), "model.layers.{i}.self_attn.v_proj.weight", *_KV, _kd),
  Entry(("layers", "attention", "wo"), "model.layers.{i}.self_attn.o_proj.weight", *_OUT, _dq),
  Entry(("layers", "mlp", "w1"), "model.layers.{i}.mlp.gate_proj.weight", _t, _t, _fd),
  Entry(("layers", "mlp", "w3"), "model.layers.{i}.mlp.up_proj.weight", _t, _t, _fd),
  Entry(("layers", "mlp", "w2"), "model.layers.{i}.mlp.down_proj.weight", _t, _t, _df),
)

# Meta's names (inside DCP they may carry a 'model.' prefix; see checkpoint.meta).
META = (
  Entry(("embed", "embedding"), "tok_embeddings.weight", _same, _same, _vd),
  Entry(("norm", "scale"), "norm.weight", _same, _same, _d),
  Entry(("lm_head",), "output.weight", _t, _t, _vd),
  Entry(
    ("layers", "attention_norm", "scale"), "layers.{i}.attention_norm.weight", _same, _same, _d
  ),
  Entry(("layers", "ffn_norm", "scale"), "layers.{i}.ffn_norm.weight", _same, _same, _d),
  Entry(
    ("layers", "attention", "wq"),
    "layers.{i}.attention.wq.weight",
    *_in_heads("n_heads", rope_interleaved=True),
    _qd,
  ),
  Entry(
    ("layers", "attention", "wk"),
    "layers.{i}.attention.wk.weight",
    *_in_heads("n_kv_heads", rope_interleaved=True),
    _kd,
  ),
  Entry(("layers", "attention", "wv"), "layers.{i}.attention.wv.weight", *_KV, _kd),
  Entry(("layers", "attention", "wo"), "layers.{i}.attention.wo.weight", *_OUT, _dq),
  Entry(("layers", "mlp", "w1"), "layers.{i}.feed_forward.w1.weight", _t, _t, _fd),
  Entry(("layers", "mlp", "w3"), "layers.{i}.feed_forward.w3.weight", _t, _t, _fd),
  Entry(("layers", "mlp", "w2"), "layers.{i}.feed_forward.w2.weight", _t, _t, _df),
)


def locate(entries, cfg: ModelConfig) -> dict[str, tuple[Entry, int | None]]:
  """External name -> (entry, layer index or None)."""
  out = {}
  for e in entries:
    for i, name in enumerate(e.names(cfg)):
      out[name] = (e, i if e.stacked else None)
  return out
