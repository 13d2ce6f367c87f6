"""Analytic plan of a model: parameters, per-layer windows, FLOPs and bytes.

Everything is derived from `jax.eval_shape` of the real model and optimizer,
so nothing is allocated: the 32B plan runs in seconds on a laptop.

Training FLOPs per token (model FLOPs, the numerator of MFU):

  6 * P_matmul + sum over layers l of 12 * N * H * keys(l)

* `P_matmul`: parameters used in matrix multiplies: every layer's attention
  and MLP projections plus the output head. The input embedding is a gather
  and the norms are elementwise, so they are excluded.
* `keys(l)`: the mean number of keys a query attends to in layer l at
  sequence length T with window W = min(window_l, T), causal mask counted
  exactly: mean over t of min(t + 1, W). Q.K^T and A.V are 2 * N * H * keys
  multiply-adds each, i.e. 4 * N * H * keys FLOPs forward, times 3 for
  forward + backward.
* Rematerialisation adds recomputation FLOPs that do not count toward MFU.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax

from cwm_jax.model import ModelConfig, abstract_model
from flax import nnx


def abstract_params(cfg: ModelConfig) -> dict:
  """The parameter pure dict of the model as ShapeDtypeStructs."""
  return nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()


def tree_size(tree) -> int:
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def mean_keys(window: int, seq_len: int) -> float:
  """Mean over queries t < seq_len of the keys seen: min(t + 1, window)."""
  w = min(window, seq_len)
  # sum_{t<w} (t+1) + (seq_len - w) * w
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_params(cfg: ModelConfig) -> int:
  d, h = cfg.dim, cfg.head_dim
  per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
  return cfg.n_layers * per_layer + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training attention-score FLOPs per token, each layer at its own window."""
  return sum(12 * cfg.n_heads * cfg.head_dim * mean_keys(w, seq_len) for w in cfg.layer_windows)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training model FLOPs per token (see module docstring)."""
  return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def default_optimizer() -> optax.GradientTransformation:
  """AdamW with float32 moments (the shape of the training optimizer's state)."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4, mu_dtype="float32"))


def analytic_plan(cfg: ModelConfig, seq_len: int | None = None,
                  optimizer: optax.GradientTransformation | None = None) -> dict[str, Any]:
  """The JSON-able plan of `cfg` at `seq_len` (default: cfg.max_seq_len)."""
  seq_len = seq_len or cfg.max_seq_len
  params = abstract_params(cfg)
  opt_state = jax.eval_shape((optimizer or default_optimizer()).init, params)
  n_params = tree_size(params)
  fpt = flops_per_token(cfg, seq_len)
  return {
      "params": n_params,
      "params_formula": cfg.param_count(),
      "matmul_params": matmul_params(cfg),
      "layers": list(cfg.layer_windows),
      "effective_windows": list(cfg.effective_windows(seq_len)),
      "global_layers": list(cfg.global_layers),
      "seq_len": seq_len,
      "flops_per_token": fpt,
      "attention_flops_per_token": attention_flops_per_token(cfg, seq_len),
      "flops_per_sequence": fpt * seq_len,
      "flops_formula": "6*matmul_params + sum_l 12*n_heads*head_dim*mean_keys(min(window_l,T), T)",
      "param_dtype": cfg.param_dtype,
      "param_bytes": tree_bytes(params),
      "optimizer_state_bytes": tree_bytes(opt_state),
      "gradient_bytes": tree_bytes(params),
  }
