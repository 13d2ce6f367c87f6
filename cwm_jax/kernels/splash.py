"""Pallas TPU splash attention with a local (or causal) mask and segment ids.

Uses `jax.experimental.pallas.ops.tpu.splash_attention`: a `LocalMask`
with left window `W - 1` (the query itself counts, as in `masks.allowed`)
or a `CausalMask` for global layers, `SegmentIds` for packed documents, and
grouped-query heads natively (MHA kernel with fewer kv heads). The kernel
is unbatched and does not scale queries, so we vmap over B and scale q.
Runs on TPU; `interpret=True` runs it on CPU for tests (slow, small shapes).

Legend: B batch, T length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _splash():
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only import
  return sa


@functools.lru_cache(maxsize=32)
def _kernel(t: int, n: int, window: int, block: int, interpret: bool):
  sa = _splash()
  if window >= t:
    head_mask = sa.CausalMask((t, t))
  else:
    head_mask = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  mask = sa.MultiHeadMask([head_mask] * n)
  b = min(block, t)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, window: int,
                     block: int = 512, interpret: bool | None = None):
  """Self-attention over packed rows; matches `reference_attention`.

  T must be a multiple of `min(block, T)` (and of 128 on a real TPU).
  `interpret` defaults to True off TPU.
  """
  b, t, n, h = q_BTNH.shape
  if t % min(block, t):
    raise ValueError(f"splash attention needs T={t} to be a multiple of the block "
                     f"{min(block, t)}; pad the sequence or set attention_chunk")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  kernel = _kernel(t, n, int(window), block, interpret)
  sa = _splash()
  q_BNTH = jnp.swapaxes(q_BTNH * jnp.asarray(h ** -0.5, q_BTNH.dtype), 1, 2)
  k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)

  def one(q, k, v, seg):
    return kernel(q, k, v, segment_ids=sa.SegmentIds(q=seg, kv=seg))

  o_BNTH = jax.vmap(one)(q_BNTH, k_BKTH, v_BKTH, segment_ids_BT)
  return jnp.swapaxes(o_BNTH, 1, 2).astype(q_BTNH.dtype)
