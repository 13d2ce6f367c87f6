"""Useful training FLOPs of a batch: matmuls per real token plus attention at
each layer's real window (keys = min(position + 1, window)), padding excluded.

A training step costs 3x the forward pass (forward + two backward matmuls).
"""

from __future__ import annotations

import numpy as np

from cwm_jax.model.config import ModelConfig

# Peak dense bf16 FLOP/s per device, by `device_kind` prefix (public spec sheets;
# CPU is the float32 XLA matmul rate measured on the 2-core dev box).
PEAK_FLOPS = {"TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
              "TPU v6": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12, "cpu": 4.5e11}


def peak_flops(device_kind: str) -> float:
  for prefix, value in PEAK_FLOPS.items():
    if device_kind.lower().startswith(prefix.lower()):
      return value
  return 0.0


def matmul_flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs of the weight matmuls for one token (embedding lookup is free)."""
  d, h = cfg.dim, cfg.head_dim
  per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
  return 6.0 * (cfg.n_layers * per_layer + d * cfg.vocab_size)


def attention_keys(cfg: ModelConfig, positions_BT: np.ndarray, segment_ids_BT: np.ndarray) -> int:
  """Sum over layers and real tokens of the number of keys each query attends to."""
  pos = positions_BT[segment_ids_BT > 0].astype(np.int64) + 1
  windows, counts = np.unique(np.asarray(cfg.layer_windows), return_counts=True)
  return int(sum(c * np.minimum(pos, w).sum() for w, c in zip(windows, counts)))


def batch_flops(cfg: ModelConfig, positions_BT: np.ndarray, segment_ids_BT: np.ndarray) -> float:
  """Training FLOPs of one batch: 6*params per token + 12*N*H per (query, key) pair."""
  tokens = int(np.count_nonzero(segment_ids_BT > 0))
  attn = 12.0 * cfg.n_heads * cfg.head_dim * attention_keys(cfg, positions_BT, segment_ids_BT)
  return tokens * matmul_flops_per_token(cfg) + attn
