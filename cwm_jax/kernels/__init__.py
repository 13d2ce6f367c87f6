"""Attention kernels: the masking rule and the backends that apply it."""

from cwm_jax.kernels.masks import allowed
from cwm_jax.kernels.reference import reference_attention
from cwm_jax.kernels.chunked import chunked_attention

__all__ = ["allowed", "reference_attention", "chunked_attention", "attend"]


def attend(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int, impl: str,
           chunk: int = 512):
  """Self-attention over a packed batch with the named backend."""
  if impl == "reference":
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, segment_ids_BT,
                               window=window)
  if impl == "chunked":
    return chunked_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window,
                             chunk=chunk)
  raise ValueError(f"unknown attention impl {impl!r}; use 'reference' or 'chunked'")
