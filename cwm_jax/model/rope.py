"""Rotary position embeddings with llama3 frequency scaling.

Layout is rotate-half (pairs (i, i + H/2)), as in Hugging Face checkpoints;
Meta's interleaved layout is converted at checkpoint load (checkpoint.names).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from cwm_jax.kernels.backend import target_platform
from cwm_jax.model.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Per-pair inverse frequencies [H/2], float64 numpy (exact, static)."""
  freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return freqs
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  old = scaling.original_context
  wavelen = 2 * math.pi / freqs
  smooth = (old / wavelen - low) / (high - low)
  scaled = np.where(wavelen > old / low, freqs / scaling.factor, freqs)
  mid = (wavelen <= old / low) & (wavelen >= old / high)
  return np.where(mid, (1 - smooth) * freqs / scaling.factor + smooth * freqs, scaled)


def apply_rope(
  x_BTNH: jnp.ndarray, positions_BT: jnp.ndarray, theta: float, scaling: RopeScaling | None
) -> jnp.ndarray:
  """Rotates queries or keys by their explicit positions (float32 math).

  Args:
    x_BTNH: [B, T, N, H] queries or keys.
    positions_BT: [B, T] integer positions (restarting per packed document).
  Returns:
    [B, T, N, H] in the dtype of `x_BTNH`.
  """
  head_dim = x_BTNH.shape[-1]
  inv = jnp.asarray(inv_frequencies(head_dim, theta, scaling), jnp.float32)
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  if target_platform() != "cpu":
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)
  # On CPU the halves swap by reversing a size-2 axis, which XLA fuses into the
  # elementwise work, forward and backward: the split/concatenate form and its gradient
  # cost a noticeable share of a small model's train step in copies, and a product with
  # a 0/1 permutation matrix costs GEMM time on every layer (projections + RoPE, fwd +
  # bwd; benchmarks/train_step.py --breakdown).
  cos2, sin2 = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)
  halves = x.reshape(*x.shape[:-1], 2, head_dim // 2)
  swapped = jnp.flip(halves, axis=-2).reshape(x.shape)
  return (x * cos2 + swapped * sin2).astype(x_BTNH.dtype)
