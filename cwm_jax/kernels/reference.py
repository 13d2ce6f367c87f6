"""Dense masked attention: the readable reference every other backend matches.

Legend: B batch, T query length, S key length, K kv heads, G queries per kv
head, N = K*G query heads, H head dim.
"""

import jax
import jax.numpy as jnp

from cwm_jax.kernels.masks import allowed

NEG_INF = -1e30


def gqa_scores(q_BTNH, k, keys: str = "BSKH"):
  """Scaled float32 scores [B, K, G, T, S] for grouped-query attention; `keys` names the
  key array's dims (the CPU KV cache stores them heads-first, "BKSH")."""
  b, t, n, h = q_BTNH.shape
  kv = k.shape[keys.index("K")]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  s = jnp.einsum(f"BTKGH,{keys}->BKGTS", q_BTKGH, k, preferred_element_type=jnp.float32)
  return s * (h ** -0.5)


def gqa_combine(probs_BKGTS, v, values: str = "BSKH"):
  """Weighted values [B, T, N, H] from float32 probabilities; `values` names the value
  array's dims (the CPU KV cache stores them transposed, "BKHS")."""
  o = jnp.einsum(f"BKGTS,{values}->BTKGH", probs_BKGTS.astype(v.dtype), v)
  b, t, kv, g, h = o.shape
  return o.reshape(b, t, kv * g, h)


def masked_softmax(scores, mask):
  return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


def reference_attention(q_BTNH, k, v, q_seg_BT, k_seg_BS, *, window, q_idx_BT=None,
                        k_idx_BS=None, keys: str = "BSKH", values: str = "BSKH"):
  """Attention with an explicit [B, T, S] mask.

  Indices default to 0..T-1 and 0..S-1 (self-attention); a KV cache passes
  its own absolute indices. `window` may be a Python int or a traced scalar.
  `keys` / `values` name the dims of `k` / `v` (as in `gqa_scores`, `gqa_combine`).
  """
  t, s = q_seg_BT.shape[1], k_seg_BS.shape[1]
  q_idx = jnp.arange(t)[None] if q_idx_BT is None else q_idx_BT
  k_idx = jnp.arange(s)[None] if k_idx_BS is None else k_idx_BS
  mask_BTS = allowed(q_idx[:, :, None], k_idx[:, None, :], q_seg_BT[:, :, None],
                     k_seg_BS[:, None, :], window)
  probs = masked_softmax(gqa_scores(q_BTNH, k, keys), mask_BTS[:, None, None])
  return gqa_combine(probs, v, values)
