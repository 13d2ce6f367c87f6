"""The KV cache the model's attention reads and writes: one ring buffer per window group.

Legend: L layers of a group, B batch, T new tokens, S cache slots, K kv heads,
N query heads, H head dim.

Layers are grouped by window (`groups[i]` indexes the sorted distinct windows,
the same tuple the layer scan switches over). A group's buffers are
[L, B, S, K, H] with `S = min(window, cache_len)`: local layers keep exactly
their window of keys (O(W) memory), global layers the whole sequence.

Rows are ragged: row b holds the tokens at columns (= positions)
`0 .. length_B[b]-1`, the token at column c in slot `c % S`, so a slot's
column follows from the row's length and the cache stores no index arrays.
A forward pass feeds a [B, T] block of which row b's first `n_B[b]` tokens
are real (right padding): they go to columns `length_B[b] ..`, the rest is
neither written nor counted. So rows grow at their own pace: a finished row
stops growing while others decode, and a later turn appends to each row
exactly its own new tokens (a tool's output, say) without recomputing what
is cached.

Under the layer scan a layer's group and slot are traced scalars: a write
touches every group's buffer (the layer's own with the new keys, the others
with a scatter whose every index is out of bounds, i.e. dropped), so each
buffer is updated in place in the scan carry; attention reads the layer's
buffer through a `lax.switch` over groups.
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
  """Per-group key/value buffers and the number of columns each row holds.

  `empty` (static) marks a cache no token was written to: the next forward
  pass is a prefill, whose queries attend among themselves.
  """
  k: tuple   # per group [L, B, S, K, H]
  v: tuple
  length_B: jnp.ndarray   # [B] columns (tokens) each row holds
  layout: CacheLayout = struct.field(pytree_node=False)
  empty: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class LayerCache:
  """One layer's handle on the cache: its slot inside its group (traced under scan)."""
  cache: KVCache
  slot: jnp.ndarray | int


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype) -> KVCache:
  """An empty cache for `batch` rows of at most `cache_len` columns."""
  layout = cache_layout(cfg, cache_len)
  zeros = []
  for g, size in enumerate(layout.sizes):
    n = layout.groups.count(g)
    z = jnp.zeros((n, batch, size, cfg.n_kv_heads, cfg.head_dim), dtype)
    zeros.append(constrain(z, CACHE_AXES))
  return KVCache(k=tuple(zeros), v=tuple(zeros), length_B=jnp.zeros((batch,), jnp.int32),
                 layout=layout)


def slot_columns(length, size: int):
  """Column held by each of `size` slots after `length` writes ([...] lengths give
  [..., S]); -1 if empty."""
  last = jnp.asarray(length)[..., None] - 1
  cols = last - jnp.mod(last - jnp.arange(size), size)
  return jnp.where(cols >= 0, cols, -1)


def _put(buf, group, g, slot, cols_BT, write_BT, new_BTKH):
  """Scatters row b's tokens where `write_BT` to slots `cols % S` of layer `slot` of
  group g's buffer [L, B, S, K, H]; nothing when the layer is not in group g."""
  size = buf.shape[2]
  if isinstance(group, int):
    if group != g:
      return buf
    at = slot
  else:
    write_BT, at = write_BT & (group == g), jnp.where(group == g, slot, 0)
  slots_BT = jnp.where(write_BT, jnp.mod(cols_BT, size), size)  # size: out of bounds, dropped
  rows_BT = jnp.broadcast_to(jnp.arange(buf.shape[1])[:, None], slots_BT.shape)
  # One scatter over (layer, row, slot), in the buffer's own layout: in place.
  return constrain(buf.at[at, rows_BT, slots_BT].set(new_BTKH.astype(buf.dtype), mode="drop"),
                   CACHE_AXES)


def _columns(cache: KVCache, n_B, t: int):
  """Columns [B, T] of a fed block and which of its tokens are real."""
  t_T = jnp.arange(t, dtype=jnp.int32)
  return cache.length_B[:, None] + t_T[None], t_T[None] < n_B[:, None]


def write(handle: LayerCache, group, k_BTKH, v_BTKH, n_B) -> LayerCache:
  """Stores the first `n_B[b]` keys/values of each row at its columns `length_B[b] ..`
  (of a longer block only the last S of a group fit its ring: the others are dropped).

  `group` is a Python int (unrolled layers) or a traced index (scanned layers).
  """
  cache, slot = handle.cache, handle.slot
  cols_BT, real_BT = _columns(cache, n_B, k_BTKH.shape[1])
  # Keys arrive split like activations (by position over `sequence`, say): split them like
  # the cache first, else the partitioner may gather every row's buffer to write them.
  k_BTKH, v_BTKH = (constrain(x, CACHE_AXES[1:]) for x in (k_BTKH, v_BTKH))

  def put(g, buf, new_BTKH):
    keep_BT = real_BT & (cols_BT >= cache.length_B[:, None] + n_B[:, None] - buf.shape[2])
    return _put(buf, group, g, slot, cols_BT, keep_BT, new_BTKH)

  ks = tuple(put(g, buf, k_BTKH) for g, buf in enumerate(cache.k))
  vs = tuple(put(g, buf, v_BTKH) for g, buf in enumerate(cache.v))
  return handle.replace(cache=cache.replace(k=ks, v=vs))


def attend(handle: LayerCache, group, q_BTNH, k_BTKH, v_BTKH, n_B):
  """Attention of a fed block's queries over the layer's cached keys and the block's
  own keys (causal, windowed; padding queries attend as if real, their output is
  unused); then writes the block. `(out [B, T, N, H], handle)`.

  One token per row (decoding) is written first and read back from the ring, which
  copies nothing; a longer block attends over the ring as it was plus the block, since
  its own writes may evict keys its earlier queries still see.
  """
  cache, slot = handle.cache, handle.slot
  b, t = q_BTNH.shape[:2]
  cols_BT, real_BT = _columns(cache, n_B, t)
  ones_BT = jnp.ones((b, t), jnp.int32)
  if t == 1:
    handle = write(handle, group, k_BTKH, v_BTKH, n_B)
  ring = handle.cache

  def one(g, k_bufs, v_bufs):
    size = cache.layout.sizes[g]
    k_cols_BS = slot_columns(cache.length_B + (n_B if t == 1 else 0), size)
    k_BSKH = jax.lax.dynamic_index_in_dim(k_bufs[g], slot, axis=0, keepdims=False)
    v_BSKH = jax.lax.dynamic_index_in_dim(v_bufs[g], slot, axis=0, keepdims=False)
    k_seg_BS = (k_cols_BS >= 0).astype(jnp.int32)
    if t > 1:
      k_BSKH = jnp.concatenate([k_BSKH, k_BTKH.astype(k_BSKH.dtype)], axis=1)
      v_BSKH = jnp.concatenate([v_BSKH, v_BTKH.astype(v_BSKH.dtype)], axis=1)
      k_cols_BS = jnp.concatenate([k_cols_BS, cols_BT], axis=1)
      k_seg_BS = jnp.concatenate([k_seg_BS, real_BT.astype(jnp.int32)], axis=1)
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, ones_BT, k_seg_BS,
                               window=cache.layout.windows[g], q_idx_BT=cols_BT,
                               k_idx_BS=k_cols_BS)

  if isinstance(group, int):
    out = one(group, ring.k, ring.v)
  else:
    branches = [lambda k, v, g=g: one(g, k, v) for g in range(len(ring.k))]
    out = jax.lax.switch(group, branches, ring.k, ring.v)
  if t > 1:
    handle = write(handle, group, k_BTKH, v_BTKH, n_B)
  return out, handle


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
