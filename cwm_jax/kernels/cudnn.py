"""cuDNN flash attention through `jax.nn.dot_product_attention`.

Causal with `local_window_size=(W - 1, 0)` for local layers (the query
itself counts, as in `masks.allowed`) and a boolean same-segment mask for
packed documents. `implementation='cudnn'` needs an NVIDIA GPU; the same
call with `implementation='xla'` runs anywhere and is what the CPU tests
compare against the reference. Importing this module never touches a GPU.

Legend: B batch, T length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, window: int,
                    implementation: str = "cudnn"):
  """Self-attention over packed rows; matches `reference_attention`."""
  t = q_BTNH.shape[1]
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise RuntimeError("attention_impl='cudnn' needs an NVIDIA GPU (backend is "
                       f"{jax.default_backend()!r}); use 'chunked' on CPU/TPU")
  mask_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  local = (window - 1, 0) if window < t else None
  return jax.nn.dot_product_attention(
      q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS, is_causal=True,
      local_window_size=local, implementation=implementation)
