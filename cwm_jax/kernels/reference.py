"""Dense masked attention: the readable reference every other backend matches.

Legend: B batch, T query length, S key length, K kv heads, G queries per kv
head, N = K*G query heads, H head dim.
"""

import jax
import jax.numpy as jnp

from cwm_jax.kernels.masks import allowed

NEG_INF = -1e30


# One query row per batch row (decoding) against the CPU cache's heads-first layout: each
# of the G query heads of a kv head runs as its own batched matrix-vector product, which
# XLA:CPU streams over the cache faster than one batched [G, H] x [H, S] product, alone
# and in a whole decode step (benchmarks/sampler.py).
MATVEC_KEYS, MATVEC_VALUES = "BKSH", "BKHS"


def gqa_scores(q_BTNH, k, keys: str = "BSKH"):
  """Scaled float32 scores [B, K, G, T, S] for grouped-query attention; `keys` names the
  key array's dims (the CPU KV cache stores them heads-first, "BKSH")."""
  b, t, n, h = q_BTNH.shape
  kv = k.shape[keys.index("K")]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  if t == 1 and keys == MATVEC_KEYS:
    s = jnp.stack(
      [
        jnp.einsum("BKSH,BKH->BKS", k, q_BTKGH[:, 0, :, i], preferred_element_type=jnp.float32)
        for i in range(n // kv)
      ],
      axis=2,
    )[:, :, :, None]
  else:
    s = jnp.einsum(f"BTKGH,{keys}->BKGTS", q_BTKGH, k, preferred_element_type=jnp.float32)
  return s * (h**-0.5)


def gqa_combine(probs_BKGTS, v, values: str = "BSKH"):
  """Weighted values [B, T, N, H] from float32 probabilities; `values` names the value
  array's dims (the CPU KV cache stores them transposed, "BKHS")."""
  p = probs_BKGTS.astype(v.dtype)
  b, kv, g, t = p.shape[:4]
  if t == 1 and values == MATVEC_VALUES:
    o = jnp.stack([jnp.einsum("BKHS,BKS->BKH", v, p[:, :, i, 0]) for i in range(g)], axis=2)[
      :, None
    ]
  else:
    o = jnp.einsum(f"BKGTS,{values}->BTKGH", p, v)
  return o.reshape(b, t, kv * g, o.shape[-1])


def masked_softmax(scores, mask):
  return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


def reference_attention(
  q_BTNH,
  k,
  v,
  q_seg_BT,
  k_seg_BS,
  *,
  window,
  q_idx_BT=None,
  k_idx_BS=None,
  keys: str = "BSKH",
  values: str = "BSKH",
):
  """Attention with an explicit [B, T, S] mask.

  Indices default to 0..T-1 and 0..S-1 (self-attention); a KV cache passes
  its own absolute indices. `window` may be a Python int or a traced scalar.
  `keys` / `values` name the dims of `k` / `v` (as in `gqa_scores`, `gqa_combine`).
  """
  t, s = q_seg_BT.shape[1], k_seg_BS.shape[1]
  q_idx = jnp.arange(t)[None] if q_idx_BT is None else q_idx_BT
  k_idx = jnp.arange(s)[None] if k_idx_BS is None else k_idx_BS
  mask_BTS = allowed(
    q_idx[:, :, None], k_idx[:, None, :], q_seg_BT[:, :, None], k_seg_BS[:, None, :], window
  )
  probs = masked_softmax(gqa_scores(q_BTNH, k, keys), mask_BTS[:, None, None])
  return gqa_combine(probs, v, values)
