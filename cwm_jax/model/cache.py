"""The KV cache the model's attention reads and writes: one ring buffer per window group.

Legend: L layers of a group, B batch, T new tokens, S cache slots, K kv heads,
N query heads, H head dim.

Layers are grouped by window (`groups[i]` indexes the sorted distinct windows,
the same tuple the layer scan switches over). A group's buffers are
[L, B, S, K, H] with `S = min(window, cache_len)`: local layers keep exactly
their window of keys (O(W) memory), global layers the whole sequence.

On CPU (`CacheLayout.transposed`, from `backend.Forms.transposed_cache`) keys are
[L, B, K, S, H] and values [L, B, K, H, S]: both attention products then contract each
operand's minor dimension (scores over H, values over S), so a decode step reads the cache in
place, where with [L, B, S, K, H] buffers XLA:CPU copied every layer's keys and
values transposed at each step. On TPU the transposed values cost the opposite
(a copy of the cache per decode step), so accelerators keep [L, B, S, K, H].
The CPU decode loop also splits the cache by layer (`by_layer`: one group per
layer) so that each layer's buffers are arrays of their own, read in place.

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

from cwm_jax.kernels import backend
from cwm_jax.kernels.reference import reference_attention
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.logical import constrain, logical_to_spec

CACHE_AXES = (None, "batch", None, "act_kv_heads", None)  # [L, B, S, K, H]
TRANSPOSED_CACHE_AXES = (None, "batch", "act_kv_heads", None, None)  # [L, B, K, S|H, H|S]


def distinct_windows(cfg: ModelConfig) -> tuple[int, ...]:
  """The sorted distinct layer windows: the scan's switch branches and the cache groups."""
  return tuple(sorted(set(cfg.layer_windows)))


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """Static placement of layers in groups: layer i is `slots[i]` of group `groups[i]`."""

  windows: tuple[int, ...]  # window of each group
  sizes: tuple[int, ...]  # ring-buffer slots of each group
  groups: tuple[int, ...]  # group of each layer
  slots: tuple[int, ...]  # index of each layer inside its group
  transposed: bool = False  # keys [L, B, K, S, H], values [L, B, K, H, S] (CPU)

  def window(self, layer: int) -> int:
    return self.windows[self.groups[layer]]

  @property
  def axes(self) -> tuple:
    """Logical axis names of every buffer."""
    return TRANSPOSED_CACHE_AXES if self.transposed else CACHE_AXES

  @property
  def dims(self) -> dict:
    """Dim names of a layer's [B, ...] key and value buffers (`reference_attention`); the
    buffers' shapes, slot axes and a fed block's transpose all follow from them."""
    if self.transposed:
      return {"keys": "BKSH", "values": "BKHS"}
    return {"keys": "BSKH", "values": "BSKH"}

  def _dims(self, values: bool) -> str:
    return self.dims["values" if values else "keys"]

  def shape(self, group: int, batch: int, kv_heads: int, head_dim: int, values: bool) -> tuple:
    sizes = {"B": batch, "S": self.sizes[group], "K": kv_heads, "H": head_dim}
    return (self.groups.count(group),) + tuple(sizes[d] for d in self._dims(values))

  def slot_axis(self, values: bool) -> int:
    """The S axis of a layer's [B, ...] buffer."""
    return self._dims(values).index("S")

  def block(self, x_BTKH, values: bool):
    """A fed block's keys or values [B, T, K, H] in a layer buffer's layout."""
    order = tuple("BSKH".index(d) for d in self._dims(values))
    return x_BTKH if order == (0, 1, 2, 3) else x_BTKH.transpose(order)


def _by_window(layer_windows, layer_sizes, transposed: bool) -> CacheLayout:
  """Layers grouped by window (the groups the layer scan switches over)."""
  windows = tuple(sorted(set(layer_windows)))
  groups = tuple(windows.index(w) for w in layer_windows)
  slots = tuple(groups[:i].count(g) for i, g in enumerate(groups))
  sizes = tuple(layer_sizes[groups.index(g)] for g in range(len(windows)))
  return CacheLayout(windows, sizes, groups, slots, transposed)


def cache_layout(cfg: ModelConfig, cache_len: int) -> CacheLayout:
  return _by_window(
    cfg.layer_windows,
    [min(w, cache_len) for w in cfg.layer_windows],
    transposed=backend.forms().transposed_cache,
  )


@struct.dataclass
class KVCache:
  """Per-group key/value buffers and the number of columns each row holds.

  `empty` (static) marks a cache no token was written to: the next forward
  pass is a prefill, whose queries attend among themselves.
  """

  k: tuple  # per group [L, B, S, K, H]; transposed layout [L, B, K, S, H]
  v: tuple  # per group [L, B, S, K, H]; transposed layout [L, B, K, H, S]
  length_B: jnp.ndarray  # [B] columns (tokens) each row holds
  layout: CacheLayout = struct.field(pytree_node=False)
  empty: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class LayerCache:
  """One layer's handle on the cache: its group and its slot inside the group (Python
  ints for unrolled layers, traced under scan)."""

  cache: KVCache
  slot: jnp.ndarray | int
  group: jnp.ndarray | int


def _layer_buffers(cache: KVCache, i: int) -> tuple:
  layout = cache.layout
  return tuple(bufs[layout.groups[i]][layout.slots[i]] for bufs in (cache.k, cache.v))


def by_layer(cache: KVCache) -> KVCache:
  """The cache with one group per layer ([1, ...] buffers). Unrolled layers then read
  and write their own arrays in place, where XLA:CPU copies a layer's slice out of a
  group's stacked buffer each time it is read (every decode step). `by_window` undoes it;
  the layer scan needs the cache by window."""
  layout, n = cache.layout, len(cache.layout.groups)
  per_layer = [_layer_buffers(cache, i) for i in range(n)]
  split = CacheLayout(
    windows=tuple(layout.window(i) for i in range(n)),
    sizes=tuple(layout.sizes[g] for g in layout.groups),
    groups=tuple(range(n)),
    slots=(0,) * n,
    transposed=layout.transposed,
  )
  return cache.replace(
    k=tuple(k[None] for k, _ in per_layer), v=tuple(v[None] for _, v in per_layer), layout=split
  )


def by_window(cache: KVCache) -> KVCache:
  """The cache with layers grouped by window (as `init_cache` makes it)."""
  layout, n = cache.layout, len(cache.layout.groups)
  grouped = _by_window(
    [layout.window(i) for i in range(n)],
    [layout.sizes[g] for g in layout.groups],
    layout.transposed,
  )
  if grouped == layout:
    return cache
  per_layer = [_layer_buffers(cache, i) for i in range(n)]

  def stack(which):
    return tuple(
      constrain(
        jnp.stack([per_layer[i][which] for i in range(n) if grouped.groups[i] == g]), grouped.axes
      )
      for g in range(len(grouped.windows))
    )

  return cache.replace(k=stack(0), v=stack(1), layout=grouped)


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype) -> KVCache:
  """An empty cache for `batch` rows of at most `cache_len` columns."""
  layout = cache_layout(cfg, cache_len)

  def zeros(g, values):
    shape = layout.shape(g, batch, cfg.n_kv_heads, cfg.head_dim, values)
    return constrain(jnp.zeros(shape, dtype), layout.axes)

  groups = range(len(layout.sizes))
  return KVCache(
    k=tuple(zeros(g, False) for g in groups),
    v=tuple(zeros(g, True) for g in groups),
    length_B=jnp.zeros((batch,), jnp.int32),
    layout=layout,
  )


def slot_columns(length, size: int):
  """Column held by each of `size` slots after `length` writes ([...] lengths give
  [..., S]); -1 if empty."""
  last = jnp.asarray(length)[..., None] - 1
  cols = last - jnp.mod(last - jnp.arange(size), size)
  return jnp.where(cols >= 0, cols, -1)


def _put(layout, buf, group, g, slot, cols_BT, write_BT, new_BTKH, values: bool):
  """Scatters row b's tokens where `write_BT` to slots `cols % S` of layer `slot` of
  group g's keys (or `values`) buffer; nothing when the layer is not in group g."""
  axis = layout.slot_axis(values)
  size = buf.shape[1 + axis]
  if isinstance(group, int):
    if group != g:
      return buf
    at = slot
  else:
    write_BT, at = write_BT & (group == g), jnp.where(group == g, slot, 0)
  slots_BT = jnp.where(write_BT, jnp.mod(cols_BT, size), size)  # size: out of bounds, dropped
  rows_BT = jnp.broadcast_to(jnp.arange(buf.shape[1])[:, None], slots_BT.shape)
  # One scatter over (layer, row, slot), in the buffer's own layout: in place. Index arrays
  # split by slices (transposed layout) put the update's [B, T] dims first: [B, T, K, H].
  index = (at, rows_BT) + (slice(None),) * (axis - 1) + (slots_BT,)
  return constrain(buf.at[index].set(new_BTKH.astype(buf.dtype), mode="drop"), layout.axes)


def _columns(cache: KVCache, n_B, t: int):
  """Columns [B, T] of a fed block and which of its tokens are real."""
  t_T = jnp.arange(t, dtype=jnp.int32)
  return cache.length_B[:, None] + t_T[None], t_T[None] < n_B[:, None]


def write(handle: LayerCache, k_BTKH, v_BTKH, n_B) -> LayerCache:
  """Stores the first `n_B[b]` keys/values of each row at its columns `length_B[b] ..`
  (of a longer block only the last S of a group fit its ring: the others are dropped)."""
  cache, slot, group = handle.cache, handle.slot, handle.group
  cols_BT, real_BT = _columns(cache, n_B, k_BTKH.shape[1])
  # Keys arrive split like activations (by position over `sequence`, say): split them like
  # the cache first, else the partitioner may gather every row's buffer to write them.
  k_BTKH, v_BTKH = (constrain(x, ("batch", None, "act_kv_heads", None)) for x in (k_BTKH, v_BTKH))

  def put(g, buf, new_BTKH, values):
    size = cache.layout.sizes[g]
    keep_BT = real_BT & (cols_BT >= cache.length_B[:, None] + n_B[:, None] - size)
    return _put(cache.layout, buf, group, g, slot, cols_BT, keep_BT, new_BTKH, values)

  ks = tuple(put(g, buf, k_BTKH, False) for g, buf in enumerate(cache.k))
  vs = tuple(put(g, buf, v_BTKH, True) for g, buf in enumerate(cache.v))
  return handle.replace(cache=cache.replace(k=ks, v=vs))


def attend(handle: LayerCache, q_BTNH, k_BTKH, v_BTKH, n_B):
  """Attention of a fed block's queries over the layer's cached keys and the block's
  own keys (causal, windowed; padding queries attend as if real, their output is
  unused); then writes the block. `(out [B, T, N, H], handle)`.

  One token per row (decoding) is written first and read back from the ring, which
  copies nothing; a longer block attends over the ring as it was plus the block, since
  its own writes may evict keys its earlier queries still see.
  """
  cache, slot, group = handle.cache, handle.slot, handle.group
  layout = cache.layout
  b, t = q_BTNH.shape[:2]
  cols_BT, real_BT = _columns(cache, n_B, t)
  ones_BT = jnp.ones((b, t), jnp.int32)
  if t == 1:
    handle = write(handle, k_BTKH, v_BTKH, n_B)
  ring = handle.cache

  def one(g, k_bufs, v_bufs):
    k_cols_BS = slot_columns(cache.length_B + (n_B if t == 1 else 0), layout.sizes[g])
    k = jax.lax.dynamic_index_in_dim(k_bufs[g], slot, axis=0, keepdims=False)
    v = jax.lax.dynamic_index_in_dim(v_bufs[g], slot, axis=0, keepdims=False)
    k_seg_BS = (k_cols_BS >= 0).astype(jnp.int32)
    if t > 1:
      k = jnp.concatenate(
        [k, layout.block(k_BTKH.astype(k.dtype), False)], axis=layout.slot_axis(False)
      )
      v = jnp.concatenate(
        [v, layout.block(v_BTKH.astype(v.dtype), True)], axis=layout.slot_axis(True)
      )
      k_cols_BS = jnp.concatenate([k_cols_BS, cols_BT], axis=1)
      k_seg_BS = jnp.concatenate([k_seg_BS, real_BT.astype(jnp.int32)], axis=1)
    return reference_attention(
      q_BTNH,
      k,
      v,
      ones_BT,
      k_seg_BS,
      window=layout.windows[g],
      q_idx_BT=cols_BT,
      k_idx_BS=k_cols_BS,
      **layout.dims,
    )

  if isinstance(group, int):
    out = one(group, ring.k, ring.v)
  else:
    branches = [lambda k, v, g=g: one(g, k, v) for g in range(len(ring.k))]
    out = jax.lax.switch(group, branches, ring.k, ring.v)
  if t > 1:
    handle = write(handle, k_BTKH, v_BTKH, n_B)
  return out, handle


def cache_bytes(cache: KVCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))


def cache_shardings(cache: KVCache, mesh: Mesh, rules) -> KVCache:
  """NamedShardings of a cache's arrays (e.g. of `jax.eval_shape(init_cache, ...)`) under
  the logical `rules` (normalized tuples), by rank: the 5-d buffers by the layout's axes,
  scalars replicated, any other array per row (leading dim B, by 'batch')."""

  def one(x):
    if x.ndim in (0, 5):
      names = cache.layout.axes if x.ndim else ()
    else:
      names = ("batch",) + (None,) * (x.ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules))

  return jax.tree.map(one, cache)
