"""All FLOP counting: model FLOPs of a token, a sequence, a packed batch; chip peaks.

Training FLOPs per token (the numerator of MFU):

  6 * P_matmul + sum over layers l of 12 * N * H * keys(l)

* `P_matmul`: parameters used in matrix multiplies: every layer's attention and
  MLP projections plus the output head. The input embedding is a gather and the
  norms are elementwise, so they are excluded.
* `keys(l)`: the keys a query attends to in layer l, causal and windowed:
  min(position + 1, window_l). Q.K^T and A.V are 2 * N * H multiply-adds per
  (query, key) pair each, i.e. 4 * N * H FLOPs forward, times 3 for forward +
  backward. A full sequence of length T has `causal_pairs(T, W)` pairs; a packed
  batch counts each document's own positions (padding excluded).
* Rematerialisation adds recomputation FLOPs that do not count toward MFU.

`dot_flops` counts what a traced program executes instead: every matrix product
of its jaxpr, recomputation and masked block edges included.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend import core as jax_core

from cwm_jax.model.config import ModelConfig

FORMULA = "6*matmul_params + sum_l 12*n_heads*head_dim*mean_keys(min(window_l,T), T)"

# Peak dense bf16 FLOP/s per device, by `device_kind` prefix (public spec sheets;
# CPU is the float32 XLA matmul rate measured on the 2-core dev box).
PEAK_FLOPS = {
  "TPU v5p": 459e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,
  "TPU v4": 275e12,
  "TPU v6": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
  "cpu": 4.5e11,
}


def peak_flops(device_kind: str) -> float:
  """Peak bf16 FLOP/s of a device kind (0.0 if unknown)."""
  for prefix, value in PEAK_FLOPS.items():
    if device_kind.lower().startswith(prefix.lower()):
      return value
  return 0.0


def tree_size(tree) -> int:
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters used in matmuls: attention and MLP projections plus the output head."""
  d, h = cfg.dim, cfg.head_dim
  per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
  return cfg.n_layers * per_layer + d * cfg.vocab_size


def matmul_flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs of the weight matmuls for one token (embedding lookup is free)."""
  return 6.0 * matmul_params(cfg)


def causal_pairs(seq_len: int, window: int) -> int:
  """(query, key) pairs of one causal windowed sequence: sum over t of min(t + 1, W)."""
  w = min(window, seq_len)
  return w * (w + 1) // 2 + (seq_len - w) * w


def mean_keys(window: int, seq_len: int) -> float:
  """Mean over queries t < seq_len of the keys seen: min(t + 1, window)."""
  return causal_pairs(seq_len, window) / seq_len


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training attention-score FLOPs per token, each layer at its own window."""
  return sum(12 * cfg.n_heads * cfg.head_dim * mean_keys(w, seq_len) for w in cfg.layer_windows)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training model FLOPs per token of full sequences of `seq_len` (see module docstring)."""
  return matmul_flops_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


def attention_keys(cfg: ModelConfig, positions_BT: np.ndarray, segment_ids_BT: np.ndarray) -> int:
  """Sum over layers and real tokens of the number of keys each query attends to."""
  pos = positions_BT[segment_ids_BT > 0].astype(np.int64) + 1
  windows, counts = np.unique(np.asarray(cfg.layer_windows), return_counts=True)
  return int(sum(c * np.minimum(pos, w).sum() for w, c in zip(windows, counts)))


def batch_flops(cfg: ModelConfig, positions_BT: np.ndarray, segment_ids_BT: np.ndarray) -> float:
  """Training FLOPs of one packed batch: 6*params per real token + 12*N*H per pair."""
  tokens = int(np.count_nonzero(segment_ids_BT > 0))
  attn = 12.0 * cfg.n_heads * cfg.head_dim * attention_keys(cfg, positions_BT, segment_ids_BT)
  return tokens * matmul_flops_per_token(cfg) + attn


def dot_flops(closed_jaxpr) -> float:
  """FLOPs of the matrix products a traced program runs (`jax.make_jaxpr(f)(*args)`):
  2 * output elements * contracted size per `dot_general`, through nested jaxprs (jit,
  remat, custom derivatives), a scan's body times its length, a cond at its costliest
  branch and a while loop's body once (its trip count is not static)."""
  return _jaxpr_dots(closed_jaxpr.jaxpr)


def _jaxpr_dots(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      continue
    inner = [_jaxpr_dots(j) for j in _sub_jaxprs(eqn.params)]
    if not inner:
      continue
    if eqn.primitive.name == "cond":
      total += max(inner)
    elif eqn.primitive.name == "scan":
      total += eqn.params["length"] * sum(inner)
    else:
      total += sum(inner)
  return total


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v
