"""Context parallelism: attention with activations sharded along the sequence.

Each device of the `sequence` mesh axis holds T/n consecutive rows of q, k,
v and segment ids. Local layers (window W < T) fetch only the halo they
need, the last W - 1 key rows before their shard, with `ppermute` from the
preceding shard(s); a halo longer than a shard spans several hops. Global
layers either all-gather K/V ('allgather') or pass K/V around a ring,
merging partial results by log-sum-exp ('ring'). Packed documents may cross
shard boundaries: segment ids travel with the keys, positions in the mask
are absolute. The inner kernel is the block-sparse flash kernel of `chunked`
or, with `impl='splash'`, the Pallas splash kernel: local layers run it on the
halo-extended block (a rectangular `LocalMask` whose query rows start at the
halo's end), global layers all-gather K/V and run shard r's queries against
them under a causal mask offset by r * T (one static kernel per shard, chosen
by `lax.switch`). Ring mode always uses the chunked kernel, which returns the
log-sum-exp the merge needs.

Causal work over contiguous shards is uneven: the last shard's queries see every
key, the first shard's only its own. 'zigzag' balances it: the sequence is cut
into 2n chunks and shard r holds chunks r and 2n - 1 - r (`zigzag_order`), so
every shard does the same work. The model moves its inputs into that order and
its output back (`to_zigzag` / `from_zigzag`: two `ppermute`s each, one per
half of a shard); inside, every layer all-gathers K/V, restores their natural
order, and runs each half of its queries at that half's offset (local layers
too: a halo would have to come from two directions).

Legend: B batch, T local length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cwm_jax.kernels import splash
from cwm_jax.kernels.chunked import NEG_INF, flash_attention
from cwm_jax.kernels.masks import PAD_K_SEGMENT

AXIS = "sequence"
MODES = ("allgather", "ring", "zigzag")
INNER = ("chunked", "splash")


def halo_rows(window: int, t_local: int, n_shards: int) -> int:
  """Key rows a shard needs from before its start (W - 1, capped by the sequence)."""
  return min(window - 1, (n_shards - 1) * t_local)


def _halo(x, rows, r, axis, n, fill):
  """The last `rows` rows before this shard, from 1..ceil(rows/T) shards back."""
  t = x.shape[1]
  parts = []
  for hop in range(math.ceil(rows / t), 0, -1):
    take = min(t, rows - (hop - 1) * t)
    got = jax.lax.ppermute(x[:, t - take :], axis, [(s, s + hop) for s in range(n - hop)])
    if fill is not None:  # shards with no source get padding segment ids
      got = jnp.where(r >= hop, got, fill)
    parts.append(got)
  return jnp.concatenate(parts, axis=1)


def _local(q, k, v, seg, window, chunk, axis, n, impl="chunked", fused_bwd=False):
  t = q.shape[1]
  r = jax.lax.axis_index(axis)
  rows = halo_rows(window, t, n)
  c = splash.MIN_BLOCK if impl == "splash" else min(chunk, t)
  front = -rows % c  # aligns query blocks to key blocks; local padding, not sent
  pad = lambda x, value: jnp.pad(
    x, [(0, 0), (front, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=value
  )
  k_all = pad(jnp.concatenate([_halo(k, rows, r, axis, n, None), k], axis=1), 0)
  v_all = pad(jnp.concatenate([_halo(v, rows, r, axis, n, None), v], axis=1), 0)
  s_all = pad(
    jnp.concatenate([_halo(seg, rows, r, axis, n, PAD_K_SEGMENT), seg], axis=1), PAD_K_SEGMENT
  )
  offset = front + rows
  if impl == "splash":
    return splash.attend_local(
      q, k_all, v_all, seg, s_all, window=window, offset=offset, block=chunk, fused_bwd=fused_bwd
    )
  out, _ = flash_attention(
    q,
    k_all,
    v_all,
    seg,
    s_all,
    offset + np.arange(t),
    np.arange(offset + t),
    window=window,
    chunk=c,
    q_offset=offset,
  )
  return out


def _allgather(q, k, v, seg, window, chunk, axis, n, impl="chunked", fused_bwd=False):
  t = q.shape[1]
  r = jax.lax.axis_index(axis)
  gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
  if impl == "splash":  # shard r's queries sit at key rows r*T...: one causal kernel per r
    branches = [
      functools.partial(
        splash.attend_local, window=window, offset=i * t, block=chunk, fused_bwd=fused_bwd
      )
      for i in range(n)
    ]
    return jax.lax.switch(r, branches, q, gather(k), gather(v), seg, gather(seg))
  return _chunked_vs_all(
    q, gather(k), gather(v), seg, gather(seg), r * t + jnp.arange(t), window, chunk
  )


def _chunked_vs_all(q, k_all, v_all, seg, s_all, q_idx, window, chunk):
  """The chunked kernel of a shard's queries (at positions `q_idx`) against every key."""
  out, _ = flash_attention(
    q,
    k_all,
    v_all,
    seg,
    s_all,
    q_idx,
    jnp.arange(k_all.shape[1]),
    window=window,
    chunk=chunk,
    q_offset=None,
  )
  return out


def _ring(q, k, v, seg, window, chunk, axis, n):
  """Ring attention: step s sees the K/V of shard r - s; future shards are skipped."""
  t = q.shape[1]
  r = jax.lax.axis_index(axis)
  idx = np.arange(t)
  out, lse = flash_attention(q, k, v, seg, seg, idx, idx, window=window, chunk=chunk)
  out = out.astype(jnp.float32)
  kvs = (k, v, seg)
  for step in range(1, n):
    kvs = jax.lax.ppermute(kvs, axis, [(s, (s + 1) % n) for s in range(n)])
    src = (r - step) % n

    def past(kvs, src=src):
      k_s, v_s, seg_s = kvs
      o, l = flash_attention(
        q,
        k_s,
        v_s,
        seg,
        seg_s,
        r * t + idx,
        src * t + idx,
        window=window,
        chunk=chunk,
        q_offset=None,
      )
      return o.astype(jnp.float32), l

    def future(kvs):
      return jnp.zeros(out.shape, jnp.float32), jnp.full(lse.shape, NEG_INF, jnp.float32)

    o_s, lse_s = jax.lax.cond(src < r, past, future, kvs)
    new = jnp.logaddexp(lse, lse_s)
    out = out * jnp.exp(lse - new)[..., None] + o_s * jnp.exp(lse_s - new)[..., None]
    lse = new
  return out.astype(q.dtype)


def zigzag_order(length: int, n: int) -> np.ndarray:
  """The natural positions in zigzag order: shard r's rows are chunks r and
  2n - 1 - r of 2n equal chunks (`x[:, zigzag_order(T, n)]` is the zigzag layout)."""
  if length % (2 * n):
    raise ValueError(
      f"context_parallel='zigzag': sequence length {length} is not a multiple of twice "
      f"the {AXIS!r} mesh axis ({2 * n}); pad the batch to a multiple of {2 * n} or use "
      "'allgather'"
    )
  c = length // (2 * n)
  chunks = [j for r in range(n) for j in (r, 2 * n - 1 - r)]
  return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def _zigzag_shard(j: int, n: int) -> int:
  """The shard holding chunk j of 2n in zigzag order."""
  return j if j < n else 2 * n - 1 - j


def _swap_halves(x, axis, n, inverse):
  """Inside shard_map: natural rows (chunks 2s, 2s + 1 on shard s) to zigzag (chunks r
  and 2n - 1 - r on shard r), or back. Each shard sends one even and one odd chunk and
  receives one of each (r and 2n - 1 - r differ in parity), so two ppermutes suffice."""
  c = x.shape[1] // 2
  first, second = x[:, :c], x[:, c:]
  even_pairs = [(s, _zigzag_shard(2 * s, n)) for s in range(n)]
  odd_pairs = [(s, _zigzag_shard(2 * s + 1, n)) for s in range(n)]
  flip = lambda pairs: [(b, a) for a, b in pairs]
  r_even = jax.lax.axis_index(axis) % 2 == 0
  if not inverse:
    even = jax.lax.ppermute(first, axis, even_pairs)
    odd = jax.lax.ppermute(second, axis, odd_pairs)
    # Shard r's first chunk, r, is its even one when r is even.
    return jnp.concatenate([jnp.where(r_even, even, odd), jnp.where(r_even, odd, even)], axis=1)
  even = jnp.where(r_even, first, second)
  odd = jnp.where(r_even, second, first)
  return jnp.concatenate(
    [jax.lax.ppermute(even, axis, flip(even_pairs)), jax.lax.ppermute(odd, axis, flip(odd_pairs))],
    axis=1,
  )


def _reorder(x, spec: P, axis: str, inverse: bool):
  mesh = jax.sharding.get_abstract_mesh()
  n = mesh.shape[axis]
  zigzag_order(x.shape[1], n)  # checks the length
  fn = functools.partial(_swap_halves, axis=axis, n=n, inverse=inverse)
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(x)


def to_zigzag(x, spec: P, axis: str = AXIS):
  """A global array [B, T, ...] (dim 1 on `axis`, per `spec`) in zigzag order:
  `x[:, zigzag_order(T, n)]`, by two ppermutes over `axis` (current mesh)."""
  return _reorder(x, spec, axis, inverse=False)


def from_zigzag(x, spec: P, axis: str = AXIS):
  """The inverse of `to_zigzag`."""
  return _reorder(x, spec, axis, inverse=True)


def _natural(x, n):
  """All-gathered zigzag rows [B, n * 2c, ...] back in natural order: the first halves
  are chunks 0..n-1, the second halves chunks 2n-1..n."""
  b, length = x.shape[:2]
  parts = x.reshape(b, n, 2, length // (2 * n), *x.shape[2:])
  ordered = jnp.concatenate([parts[:, :, 0], jnp.flip(parts[:, :, 1], axis=1)], axis=1)
  return ordered.reshape(x.shape)


def _zigzag(q, k, v, seg, window, chunk, axis, n, impl="chunked", fused_bwd=False):
  """Shard r's queries (chunks r and 2n - 1 - r) against all K/V in natural order."""
  t = q.shape[1]
  c = t // 2
  r = jax.lax.axis_index(axis)
  gather = lambda x: _natural(jax.lax.all_gather(x, axis, axis=1, tiled=True), n)
  k_all, v_all, s_all = gather(k), gather(v), gather(seg)
  if impl == "splash":  # one static pair of kernels per shard

    def branch(i):
      def run(q, k_all, v_all, seg, s_all):
        halves = [
          splash.attend_local(
            q[:, h * c : (h + 1) * c],
            k_all,
            v_all,
            seg[:, h * c : (h + 1) * c],
            s_all,
            window=window,
            offset=j * c,
            block=chunk,
            fused_bwd=fused_bwd,
          )
          for h, j in enumerate((i, 2 * n - 1 - i))
        ]
        return jnp.concatenate(halves, axis=1)

      return run

    return jax.lax.switch(r, [branch(i) for i in range(n)], q, k_all, v_all, seg, s_all)
  q_idx = jnp.concatenate([r * c + jnp.arange(c), (2 * n - 1 - r) * c + jnp.arange(c)])
  return _chunked_vs_all(q, k_all, v_all, seg, s_all, q_idx, window, chunk)


def sharded_attention(
  q_BTNH,
  k_BTKH,
  v_BTKH,
  segment_ids_BT,
  *,
  window: int,
  chunk: int,
  mode: str,
  q_spec: P,
  kv_spec: P,
  seg_spec: P,
  axis: str = AXIS,
  impl: str = "chunked",
  fused_bwd: bool = False,
):
  """Self-attention of global arrays under the current mesh, sharded on `axis`.

  Specs name the mesh axes of each operand (the sequence dimension must be
  `axis`); the mesh comes from `jax.set_mesh`. `impl` is the inner kernel
  ('chunked' or 'splash'; ring mode uses 'chunked'; `fused_bwd` as in
  `splash.block_sizes`). In 'zigzag' mode the
  operands' rows are in zigzag order (`to_zigzag`), and so is the output.
  Returns [B, T, N, H] sharded like q.
  """
  if mode not in MODES:
    raise ValueError(f"context_parallel={mode!r}: use one of {MODES} (or 'none' to disable)")
  if impl not in INNER:
    raise ValueError(f"context-parallel inner kernel {impl!r}: use one of {INNER}")
  mesh = jax.sharding.get_abstract_mesh()
  n = mesh.shape[axis]
  t = q_BTNH.shape[1]
  if t % n:
    raise ValueError(
      f"sequence length {t} is not divisible by the {axis!r} mesh axis "
      f"size {n}; pad the batch to a multiple of {n}"
    )
  if mode == "zigzag":
    zigzag_order(t, n)  # checks the length
    body = lambda q, k, v, s: _zigzag(q, k, v, s, window, chunk, axis, n, impl, fused_bwd)
  elif window < t:
    body = lambda q, k, v, s: _local(q, k, v, s, window, chunk, axis, n, impl, fused_bwd)
  elif mode == "allgather":
    body = lambda q, k, v, s: _allgather(q, k, v, s, window, chunk, axis, n, impl, fused_bwd)
  else:
    body = lambda q, k, v, s: _ring(q, k, v, s, window, chunk, axis, n)
  fn = jax.shard_map(
    body, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
  )
  return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
