"""The KV cache the model's attention reads and writes: one ring buffer per window group.

Legend: L layers of a group, B batch, T new tokens, S cache slots, K kv heads,
N query heads, H head dim.

Layers are grouped by window (`groups[i]` indexes the sorted distinct windows,
the same tuple the layer scan switches over). A group's buffers are
[L, B, S, K, H] with `S = min(window, cache_len)`: local layers keep exactly
their window of keys (O(W) memory), global layers the whole sequence. The
token at column c lives in slot `c % S`; a slot's column follows from how many
columns were written, so the cache stores no index arrays. Prompts are
left-padded: every row writes the same column at each step, and `start_B`
(the first real column of each row) masks the padding.

Under the layer scan a layer's group and slot are traced scalars: a write
touches every group's buffer (the layer's own with the new keys, the others
with their current contents), so each buffer is updated in place in the scan
carry; attention reads the layer's buffer through a `lax.switch` over groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding

from cwm_jax.kernels import reference_attention
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.layers import constrain, logical_to_spec

CACHE_AXES = (None, "batch", None, "act_kv_heads", None)


def distinct_windows(cfg: ModelConfig) -> tuple[int, ...]:
  """The sorted distinct layer windows: the scan's switch branches and the cache groups."""
  return tuple(sorted(set(cfg.layer_windows)))


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
  windows = distinct_windows(cfg)
  groups = tuple(windows.index(w) for w in cfg.layer_windows)
  slots = tuple(groups[:i].count(g) for i, g in enumerate(groups))
  sizes = tuple(min(w, cache_len) for w in windows)
  return CacheLayout(windows, sizes, groups, slots)


@struct.dataclass
class KVCache:
  """Per-group key/value buffers, row starts and the number of columns written.

  `empty` (static) marks a cache no token was written to: the next forward
  pass is a prefill, whose queries attend among themselves.
  """
  k: tuple   # per group [L, B, S, K, H]
  v: tuple
  start_B: jnp.ndarray   # [B] first real (non-pad) column of each row
  length: jnp.ndarray    # scalar: columns written so far
  layout: CacheLayout = struct.field(pytree_node=False)
  empty: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class LayerCache:
  """One layer's handle on the cache: its slot inside its group (traced under scan)."""
  cache: KVCache
  slot: jnp.ndarray | int


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


def _ring_block(new_BTKH, size: int, empty: bool, first_col):
  """The slots a write covers: (block [B, t', K, H], first slot)."""
  t = new_BTKH.shape[1]
  if empty:   # columns 0..T-1: keep the last `size`, column c in slot c % size
    keep = min(t, size)
    return jnp.roll(new_BTKH[:, t - keep:], (t - keep) % size, axis=1), 0
  return new_BTKH, jnp.mod(first_col, size)


def write(handle: LayerCache, group, k_BTKH, v_BTKH) -> LayerCache:
  """Stores the layer's keys/values of columns `length .. length+T-1`.

  `group` is a Python int (unrolled layers) or a traced index (scanned layers);
  a cache with tokens in it takes one column per call (T == 1).
  """
  cache, slot = handle.cache, handle.slot
  if not cache.empty and k_BTKH.shape[1] != 1:
    raise ValueError(f"a cached forward pass over a non-empty cache takes one token per row, "
                     f"got {k_BTKH.shape[1]}; prefill the prompt into an empty cache first")

  def put(g, buf, new_BTKH):
    # Keys arrive split like activations (by position over `sequence`, say): split them like
    # the cache first, else the partitioner may gather every row's buffer to write them.
    new_BTKH = constrain(new_BTKH.astype(buf.dtype), CACHE_AXES[1:])
    block, first = _ring_block(new_BTKH, buf.shape[2], cache.empty, cache.length)
    if isinstance(group, int):
      if group != g:
        return buf
      active, at = True, slot
    else:   # rewrite other groups' slot 0 with what it holds: an in-place no-op update
      active = group == g
      at = jnp.where(active, slot, 0)
    start = (at, 0, first, 0, 0)
    if active is not True:
      old = jax.lax.dynamic_slice(buf, start, (1,) + block.shape)[0]
      block = jnp.where(active, block, old)
    return constrain(jax.lax.dynamic_update_slice(buf, block[None], start), CACHE_AXES)

  ks = tuple(put(g, buf, k_BTKH) for g, buf in enumerate(cache.k))
  vs = tuple(put(g, buf, v_BTKH) for g, buf in enumerate(cache.v))
  return handle.replace(cache=cache.replace(k=ks, v=vs))


def attend(handle: LayerCache, group, q_BTNH):
  """Attention of one new query per row (column `length`) over the layer's cached keys,
  the query's own included (call after `write`). Empty slots (column -1) and left
  padding get segment 0; queries are segment 1."""
  cache, slot = handle.cache, handle.slot
  b, t = q_BTNH.shape[:2]
  length = cache.length + 1

  def one(g, k_bufs, v_bufs):
    size = cache.layout.sizes[g]
    k_cols_S = slot_columns(length, size)
    k_seg_BS = (k_cols_S[None] >= cache.start_B[:, None]).astype(jnp.int32)
    q_idx_BT = jnp.broadcast_to(cache.length + jnp.arange(t), (b, t))
    k_idx_BS = jnp.broadcast_to(k_cols_S, (b, size))
    k_BSKH = jax.lax.dynamic_index_in_dim(k_bufs[g], slot, keepdims=False)
    v_BSKH = jax.lax.dynamic_index_in_dim(v_bufs[g], slot, keepdims=False)
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, jnp.ones((b, t), jnp.int32), k_seg_BS,
                               window=cache.layout.windows[g], q_idx_BT=q_idx_BT,
                               k_idx_BS=k_idx_BS)

  if isinstance(group, int):
    return one(group, cache.k, cache.v)
  branches = [lambda k, v, g=g: one(g, k, v) for g in range(len(cache.k))]
  return jax.lax.switch(group, branches, cache.k, cache.v)


def cache_bytes(cache: KVCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))


def cache_shardings(cache: KVCache, mesh: Mesh, rules) -> KVCache:
  """NamedShardings of a cache's arrays (e.g. of `jax.eval_shape(init_cache, ...)`) under
  the logical `rules` (normalized tuples), by rank: the [L, B, S, K, H] buffers by
  CACHE_AXES, scalars replicated, any other array per row (leading dim B, by 'batch')."""
  def one(x):
    if x.ndim in (0, 5):
      names = CACHE_AXES if x.ndim else ()
    else:
      names = ("batch",) + (None,) * (x.ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules))
  return jax.tree.map(one, cache)
