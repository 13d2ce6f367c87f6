"""Pallas TPU splash attention, sharded over a device mesh.

Uses `jax.experimental.pallas.ops.tpu.splash_attention`: a `LocalMask` with
left window `W - 1` (the query itself counts, as in `masks.allowed`) for local
layers, a `CausalMask` for global ones, `SegmentIds` for packed documents and
grouped-query heads natively (the MHA kernel with fewer kv heads). The kernel
is per device, unbatched and does not scale queries: `attend_local` scales q
and vmaps over B; `splash_attention` runs it under `jax.shard_map` with the
batch over the mesh's data axes and query heads over `tensor` (kv heads too
when divisible; otherwise each shard picks the kv heads its queries use).
Unless traced for TPU devices the kernel runs with `interpret=True` (slow; tests
use small shapes).

The block-sparse mask info is computed in Python from the static mask, so the
kernel skips key blocks outside the window or the causal triangle. A mask may
be rectangular: `offset` places query row 0 at key row `offset` (context
parallelism runs a shard's queries against its halo-extended keys).

Legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N / K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cwm_jax.kernels import backend, masks

BATCH_AXES, HEAD_AXIS = backend.BATCH_AXES, backend.HEAD_AXIS
MAX_BLOCK = 512
MIN_BLOCK = 128  # the TPU lane width: smallest sequence tile (interpret mode too)


def _sa():
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU kernel, CPU-importable

  return sa


def fit_block(length: int, block: int, min_block: int) -> int:
  """Largest tile <= `block` (halving down to `min_block`) dividing `length`."""
  if length <= block:
    return length
  b = block
  while b >= min_block:
    if length % b == 0:
      return b
    b //= 2
  raise ValueError(
    f"splash attention: sequence length {length} has no tile in "
    f"[{min_block}, {block}] dividing it; pad the sequence to a multiple "
    f"of {min_block} or set attention_chunk"
  )


def block_sizes(t: int, s: int, block: int | None = None, fused_bwd: bool = False):
  """Tile sizes for a [T, S] mask (lengths padded to multiples of MIN_BLOCK, as
  `attend_local` pads them): `block` (default 512) fitted to each length.

  `fused_bwd`: one backward kernel computes dq with dk and dv (5 matmuls per tile
  pair instead of 7 in separate dkv and dq kernels), writing a partial dq per key
  block that is summed after: S / block_kv times the queries' size in temporaries,
  so it suits short keys (pretraining lengths), not 131k."""
  bq = fit_block(t, max(block or MAX_BLOCK, MIN_BLOCK), MIN_BLOCK)
  bkv = fit_block(s, max(block or MAX_BLOCK, MIN_BLOCK), MIN_BLOCK)
  dq = {} if fused_bwd else dict(block_q_dq=bq, block_kv_dq=bkv)
  return _sa().BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    use_fused_bwd_kernel=fused_bwd,
    **dq,
  )


def _kernel(
  t: int,
  s: int,
  n: int,
  window: int,
  offset: int,
  block: int | None,
  interpret: bool,
  fused_bwd: bool = False,
):
  """Kernel for n heads of a [T, S] mask: causal if `window` covers T + offset.

  Built per trace (its mask info becomes constants of that trace); the costly
  block-sparsity analysis is cached by the splash library."""
  sa = _sa()
  if window >= t + offset:  # every query sees all its past keys
    head_mask = sa.CausalMask((t, s), offset=offset)
  else:
    head_mask = sa.LocalMask((t, s), window_size=(window - 1, 0), offset=offset)
  return sa.make_splash_mha_single_device(
    sa.MultiHeadMask([head_mask] * n),
    block_sizes=block_sizes(t, s, block, fused_bwd),
    interpret=interpret,
    residual_checkpoint_name=backend.RESIDUALS,
  )


def _interpret(interpret: bool | None) -> bool:
  """Interpret mode unless the step is traced for TPU devices (`backend.target_platform`)."""
  return backend.target_platform() != "tpu" if interpret is None else interpret


def attend_local(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  q_seg_BT,
  kv_seg_BS,
  *,
  window: int,
  offset: int = 0,
  block: int | None = None,
  interpret: bool | None = None,
  fused_bwd: bool = False,
):
  """Splash attention of unsharded (or per-shard) arrays; query row i sits at key
  position `offset + i`; `fused_bwd` as in `block_sizes`. Returns [B, T, N, H] in
  q's dtype.

  Tiles span multiples of MIN_BLOCK rows, so other lengths are padded at the end
  (queries and keys in segments no real row shares, their rows dropped after)."""
  b, t, n, h = q_BTNH.shape
  s = k_BSKH.shape[1]
  pad_t, pad_s = -t % MIN_BLOCK, -s % MIN_BLOCK
  kernel = _kernel(
    t + pad_t, s + pad_s, n, int(window), int(offset), block, _interpret(interpret), fused_bwd
  )
  sa = _sa()
  heads_first = lambda x, rows: jnp.swapaxes(masks.pad_rows(x, rows, 0), 1, 2)
  q_BNTH = heads_first(q_BTNH * jnp.asarray(h**-0.5, q_BTNH.dtype), pad_t)
  k_BKSH = heads_first(k_BSKH, pad_s).astype(q_BTNH.dtype)
  v_BKSH = heads_first(v_BSKH, pad_s).astype(q_BTNH.dtype)

  def one(q, k, v, q_seg, kv_seg):
    return kernel(q, k, v, segment_ids=sa.SegmentIds(q=q_seg, kv=kv_seg))

  o_BNTH = jax.vmap(one)(
    q_BNTH, k_BKSH, v_BKSH, *masks.pad_segments(q_seg_BT, kv_seg_BS, pad_t, pad_s)
  )
  return jnp.swapaxes(o_BNTH[:, :, :t], 1, 2).astype(q_BTNH.dtype)


def kv_for_heads(k_BSKH, n_local: int, q_per_kv: int, axis: str):
  """The kv heads used by this shard's `n_local` query heads when K is replicated
  and N is sharded over `axis` (query head i uses kv head i // G)."""
  r = jax.lax.axis_index(axis)
  if n_local % q_per_kv == 0:  # whole groups: a contiguous run of kv heads
    size = n_local // q_per_kv
    return jax.lax.dynamic_slice_in_dim(k_BSKH, r * size, size, axis=2)
  if q_per_kv % n_local == 0:  # a part of one group: one kv head
    return jax.lax.dynamic_slice_in_dim(k_BSKH, r * n_local // q_per_kv, 1, axis=2)
  idx = (r * n_local + jnp.arange(n_local)) // q_per_kv
  return jnp.take(k_BSKH, idx, axis=2)


def mesh_specs(mesh, b: int, n: int, k: int, batch_axes=BATCH_AXES, head_axis=HEAD_AXIS):
  """`backend.shard_specs`: kv heads split when `head_axis` divides K, else replicated."""
  return backend.shard_specs(mesh, b, n, k, batch_axes=batch_axes, head_axis=head_axis)


def splash_attention(
  q_BTNH,
  k_BTKH,
  v_BTKH,
  segment_ids_BT,
  *,
  window: int,
  block: int | None = None,
  interpret: bool | None = None,
  fused_bwd: bool = False,
  mesh=None,
  batch_axes=BATCH_AXES,
  head_axis: str = HEAD_AXIS,
):
  """Self-attention over packed rows; matches `reference_attention`.

  Under a mesh (`mesh`, or the one set by `jax.set_mesh`) of more than one
  device it runs per shard in `jax.shard_map` (see `mesh_specs`); the sequence
  is whole on every shard (use `context_parallel` to split it). T is padded to a
  multiple of 128 (`attend_local`); `block` caps the tile (default 512); `fused_bwd`
  as in `block_sizes`.
  """
  b, t, n, _ = q_BTNH.shape
  k = k_BTKH.shape[2]
  interpret = _interpret(interpret)
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  local = functools.partial(
    attend_local, window=window, block=block, interpret=interpret, fused_bwd=fused_bwd
  )
  if mesh is None or mesh.empty or mesh.size == 1:
    return local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, segment_ids_BT)
  q_spec, kv_spec, seg_spec = mesh_specs(mesh, b, n, k, batch_axes, head_axis)
  replicated_kv = q_spec[2] is not None and kv_spec[2] is None

  def body(q, k_, v, seg):
    if replicated_kv:
      k_ = kv_for_heads(k_, q.shape[2], n // k, head_axis)
      v = kv_for_heads(v, q.shape[2], n // k, head_axis)
    return local(q, k_, v, seg, seg)

  fn = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
    out_specs=q_spec,
    check_vma=False,
  )
  return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
