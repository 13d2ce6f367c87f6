"""Rotary position embeddings with llama3 frequency scaling.

Layout is rotate-half (pairs (i, i + H/2)), as in Hugging Face checkpoints;
Meta's interleaved layout is converted at checkpoint load (checkpoint.names).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from cwm_jax.kernels.backend import Forms
from cwm_jax.model.config import RopeScaling
from cwm_jax.model.ops import rotate_half


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
  x_BTNH: jnp.ndarray,
  positions_BT: jnp.ndarray,
  theta: float,
  scaling: RopeScaling | None,
  forms: Forms | None = None,
) -> jnp.ndarray:
  """Rotates queries or keys by their explicit positions (float32 math), in the platform's
  form of the rotation (`ops.rotate_half`; `forms`: that of the step by default).

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
  out = rotate_half(x_BTNH.astype(jnp.float32), cos, sin, forms)
  return out.astype(x_BTNH.dtype)
