"""A KV cache with one ring buffer per distinct attention window.

Legend: L layers of a group, B batch, T new tokens, S cache slots, K kv heads,
N query heads, H head dim.

Layers are grouped by window. A group's buffers are [L, B, S, K, H] with
`S = min(window, cache_len)`: local layers keep exactly their window of keys
(O(W) memory), global layers keep the whole sequence. The token at column c
lives in slot `c % S`; a slot's column is derived from how many columns were
written, so the cache stores no index arrays. Prompts are left-padded: every
row writes the same column at each step, and `start_B` (the first real column
of each row) masks the padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from cwm_jax.kernels import reference_attention
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.layers import constrain

CACHE_AXES = (None, "batch", None, "act_kv_heads", None)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """Static placement of layers in groups: layer i is `slots[i]` of group `groups[i]`."""
  windows: tuple[int, ...]   # window of each group
  sizes: tuple[int, ...]     # ring-buffer slots of each group
  groups: tuple[int, ...]    # group of each layer
  slots: tuple[int, ...]     # index of each layer inside its group

  def window(self, layer: int) -> int:
    return self.windows[self.groups[layer]]


def cache_layout(cfg: ModelConfig, cache_len: int) -> CacheLayout:
  windows = tuple(sorted(set(cfg.layer_windows)))
  groups = tuple(windows.index(w) for w in cfg.layer_windows)
  slots = tuple(groups[:i].count(g) for i, g in enumerate(groups))
  sizes = tuple(min(w, cache_len) for w in windows)
  return CacheLayout(windows, sizes, groups, slots)


@struct.dataclass
class KVCache:
  k: tuple   # per group [L, B, S, K, H]
  v: tuple
  start_B: jnp.ndarray   # [B] first real (non-pad) column of each row
  length: jnp.ndarray    # scalar: columns written so far
  layout: CacheLayout = struct.field(pytree_node=False)


def init_cache(cfg: ModelConfig, start_B, cache_len: int, dtype) -> KVCache:
  """An empty cache for `len(start_B)` rows of at most `cache_len` columns."""
  layout = cache_layout(cfg, cache_len)
  b = start_B.shape[0]
  zeros = []
  for g, size in enumerate(layout.sizes):
    n = layout.groups.count(g)
    z = jnp.zeros((n, b, size, cfg.n_kv_heads, cfg.head_dim), dtype)
    zeros.append(constrain(z, CACHE_AXES))
  return KVCache(k=tuple(zeros), v=tuple(zeros), start_B=jnp.asarray(start_B, jnp.int32),
                 length=jnp.zeros((), jnp.int32), layout=layout)


def slot_columns(length, size: int):
  """Column held by each of `size` slots after `length` writes; -1 if empty. [S]"""
  last = length - 1
  cols = last - jnp.mod(last - jnp.arange(size), size)
  return jnp.where(cols >= 0, cols, -1)


def write(cache: KVCache, layer: int, k_BTKH, v_BTKH, first_col) -> KVCache:
  """Stores keys/values of columns `first_col .. first_col+T-1` for `layer`.

  Only the last `S` columns are kept, column c in slot c % S. Prefill
  (`first_col == 0`, static) writes a rotated block; decode (T == 1) updates
  one slot in place.
  """
  g, i = cache.layout.groups[layer], cache.layout.slots[layer]
  size, t = cache.layout.sizes[g], k_BTKH.shape[1]

  def put(buf, new_BTKH):
    new_BTKH = new_BTKH.astype(buf.dtype)
    if isinstance(first_col, int) and first_col == 0:
      keep = min(t, size)
      new_BTKH = jnp.roll(new_BTKH[:, t - keep:], (t - keep) % size, axis=1)
      buf = buf.at[i, :, :keep].set(new_BTKH)
    elif t == 1:
      buf = jax.lax.dynamic_update_slice(buf, new_BTKH[None], (i, 0, first_col % size, 0, 0))
    else:  # a chunk at a traced column: scatter (slots may wrap)
      keep = min(t, size)
      slots = jnp.mod(first_col + t - keep + jnp.arange(keep), size)
      buf = buf.at[i, :, slots].set(jnp.moveaxis(new_BTKH[:, t - keep:], 1, 0))
    return constrain(buf, CACHE_AXES)

  ks, vs = list(cache.k), list(cache.v)
  ks[g], vs[g] = put(ks[g], k_BTKH), put(vs[g], v_BTKH)
  return cache.replace(k=tuple(ks), v=tuple(vs))


def attend(cache: KVCache, layer: int, q_BTNH, q_cols_T, length):
  """Attention of new queries (columns `q_cols_T`) over `layer`'s cached keys.

  `length` counts the columns written, the queries' own included. Empty slots
  (column -1) and left padding get segment 0; queries are segment 1.
  """
  g, i = cache.layout.groups[layer], cache.layout.slots[layer]
  size = cache.layout.sizes[g]
  b, t = q_BTNH.shape[:2]
  k_cols_S = slot_columns(length, size)
  k_seg_BS = (k_cols_S[None] >= cache.start_B[:, None]).astype(jnp.int32)
  q_seg_BT = jnp.ones((b, t), jnp.int32)
  q_idx_BT = jnp.broadcast_to(q_cols_T, (b, t))
  k_idx_BS = jnp.broadcast_to(k_cols_S, (b, size))
  return reference_attention(q_BTNH, cache.k[g][i], cache.v[g][i], q_seg_BT, k_seg_BS,
                             window=cache.layout.windows[g], q_idx_BT=q_idx_BT,
                             k_idx_BS=k_idx_BS)


def cache_bytes(cache: KVCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
