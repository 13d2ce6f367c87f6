"""Dense masked attention: the readable reference every other backend matches.

Legend: B batch, T query length, S key length, K kv heads, G queries per kv
head, N = K*G query heads, H head dim.
"""

import jax
import jax.numpy as jnp

from cwm_jax.kernels.masks import allowed

NEG_INF = -1e30


def gqa_scores(q_BTNH, k_BSKH):
  """Scaled float32 scores [B, K, G, T, S] for grouped-query attention."""
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                 preferred_element_type=jnp.float32)
  return s * (h ** -0.5)


def gqa_combine(probs_BKGTS, v_BSKH):
  """Weighted values [B, T, N, H] from float32 probabilities."""
  o = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  b, t, kv, g, h = o.shape
  return o.reshape(b, t, kv * g, h)


def masked_softmax(scores, mask):
  return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


def _mask_BTS(q_seg_BT, k_seg_BS, window, q_idx_BT, k_idx_BS):
  t, s = q_seg_BT.shape[1], k_seg_BS.shape[1]
  q_idx = jnp.arange(t)[None] if q_idx_BT is None else q_idx_BT
  k_idx = jnp.arange(s)[None] if k_idx_BS is None else k_idx_BS
  return allowed(q_idx[:, :, None], k_idx[:, None, :], q_seg_BT[:, :, None],
                 k_seg_BS[:, None, :], window)


def reference_attention(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, k_seg_BS, *, window,
                        q_idx_BT=None, k_idx_BS=None):
  """Attention with an explicit [B, T, S] mask.

  Indices default to 0..T-1 and 0..S-1 (self-attention); a KV cache passes
  its own absolute indices. `window` may be a Python int or a traced scalar.
  """
  mask_BTS = _mask_BTS(q_seg_BT, k_seg_BS, window, q_idx_BT, k_idx_BS)
  probs = masked_softmax(gqa_scores(q_BTNH, k_BSKH), mask_BTS[:, None, None])
  return gqa_combine(probs, v_BSKH)


def cached_attention(q_BTNH, k_BKSH, v_BKHS, q_seg_BT, k_seg_BS, *, window, q_idx_BT,
                     k_idx_BS):
  """`reference_attention` over keys stored heads-first [B, K, S, H] and values
  transposed [B, K, H, S], the KV cache's layout: both products then contract each
  operand's minor dimension, so XLA:CPU reads the cache without a transposed copy."""
  b, t, n, h = q_BTNH.shape
  kv = k_BKSH.shape[1]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  scores = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  mask_BTS = _mask_BTS(q_seg_BT, k_seg_BS, window, q_idx_BT, k_idx_BS)
  probs = masked_softmax(scores, mask_BTS[:, None, None])
  o = jnp.einsum("BKGTS,BKHS->BTKGH", probs.astype(v_BKHS.dtype), v_BKHS)
  return o.reshape(b, t, n, h)
