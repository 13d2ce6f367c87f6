"""Attention kernels: the masking rule and the backends that apply it.

Backends (all match `reference_attention`): 'reference' (dense mask),
'chunked' (pure-JAX flash attention, block-sparse over the window),
'cudnn' (cuDNN flash attention over packed documents, GPU), 'splash' (Pallas TPU).
'auto' picks one from the devices the step is traced for (`backend.resolve`):
splash on TPU, cuDNN on GPU, chunked on CPU.
`context_parallel` runs attention sharded along the sequence mesh axis.
"""

from cwm_jax.kernels.backend import resolve, resolve_chunk, target_platform
from cwm_jax.kernels.chunked import chunked_attention, flash_attention
from cwm_jax.kernels.cudnn import cudnn_attention
from cwm_jax.kernels.masks import allowed
from cwm_jax.kernels.reference import reference_attention
from cwm_jax.kernels.splash import splash_attention

IMPLS = ("auto", "reference", "chunked", "cudnn", "splash")

__all__ = [
  "allowed",
  "reference_attention",
  "chunked_attention",
  "flash_attention",
  "cudnn_attention",
  "splash_attention",
  "attend",
  "IMPLS",
  "resolve",
  "resolve_chunk",
  "target_platform",
]


def attend(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  segment_ids_BT,
  *,
  window: int,
  impl: str,
  chunk: int = 0,
  max_segments: int = 0,
  keep_probs: bool = True,
  fused_bwd: bool = False,
):
  """Self-attention over a packed batch with the named backend ('auto': `resolve`);
  `chunk` block rows (0: `resolve_chunk`); `max_segments` documents per row of
  cuDNN's packed layout (0: `cudnn.default_max_segments`); `keep_probs`: whether the
  chunked kernel's row schedule may keep its probabilities for the backward pass;
  `fused_bwd`: splash's one-kernel backward (`splash.block_sizes`)."""
  impl = resolve(impl, dtype=q_BTNH.dtype)
  chunk = resolve_chunk(chunk, q_BTNH.shape[1], window=window, head_dim=q_BTNH.shape[-1])
  if impl == "reference":
    return reference_attention(
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, segment_ids_BT, window=window
    )
  if impl == "chunked":
    return chunked_attention(
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window, chunk=chunk, keep_probs=keep_probs
    )
  if impl == "cudnn":
    return cudnn_attention(
      q_BTNH,
      k_BSKH,
      v_BSKH,
      segment_ids_BT,
      window=window,
      chunk=chunk,
      max_segments=max_segments or None,
    )
  if impl == "splash":
    return splash_attention(
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window, block=chunk, fused_bwd=fused_bwd
    )
  raise ValueError(f"unknown attention impl {impl!r}; use one of {IMPLS}")
