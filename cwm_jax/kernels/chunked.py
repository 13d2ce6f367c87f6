"""Blockwise sliding-window attention in pure JAX.

Queries are cut into blocks of C. Query block i only reads the keys
`[i*C - (nb-1)*C, (i+1)*C)`, with `nb = ceil((W-1)/C) + 1` key blocks, so a
local layer costs O(T * (W + C)) instead of O(T^2). Blocks run one after the
other under `lax.map` with rematerialisation, so live memory is one block's
[B, N, C, nb*C] scores, never a T x T matrix.
"""

import functools
import math

import jax
import jax.numpy as jnp

from cwm_jax.kernels.reference import gqa_combine, gqa_scores, masked_softmax
from cwm_jax.kernels.masks import allowed

PAD_SEGMENT = -1


def key_blocks(window: int, chunk: int, n_blocks: int) -> int:
  """Key blocks each query block reads (its own block included)."""
  return min(n_blocks, math.ceil((window - 1) / chunk) + 1)


def chunked_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, window: int, chunk: int):
  """Self-attention over packed rows; matches `reference_attention`."""
  b, t, n, h = q_BTNH.shape
  c = min(chunk, t)
  nq = -(-t // c)
  tp = nq * c
  nb = key_blocks(min(window, tp), c, nq)
  front = (nb - 1) * c
  pad_t = tp - t

  def pad(x, before, after, value=0):
    widths = [(0, 0)] * x.ndim
    widths[1] = (before, after)
    return jnp.pad(x, widths, constant_values=value)

  q = pad(q_BTNH, 0, pad_t)
  seg_q = pad(segment_ids_BT, 0, pad_t, PAD_SEGMENT)
  k = pad(k_BTKH, front, pad_t)
  v = pad(v_BTKH, front, pad_t)
  seg_k = pad(segment_ids_BT, front, pad_t, PAD_SEGMENT)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(i):
    start = i * c
    q_blk = jax.lax.dynamic_slice_in_dim(q, start, c, axis=1)
    sq = jax.lax.dynamic_slice_in_dim(seg_q, start, c, axis=1)
    k_blk = jax.lax.dynamic_slice_in_dim(k, start, nb * c, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v, start, nb * c, axis=1)
    sk = jax.lax.dynamic_slice_in_dim(seg_k, start, nb * c, axis=1)
    q_idx = start + jnp.arange(c)
    k_idx = start - front + jnp.arange(nb * c)
    mask = allowed(q_idx[:, None], k_idx[None, :], sq[:, :, None], sk[:, None, :], window)
    probs = masked_softmax(gqa_scores(q_blk, k_blk), mask[:, None, None])
    return gqa_combine(probs, v_blk)

  out_QBCNH = jax.lax.map(block, jnp.arange(nq))
  out = jnp.moveaxis(out_QBCNH, 0, 1).reshape(b, tp, n, h)
  return out[:, :t]
