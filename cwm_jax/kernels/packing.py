"""Packed rows in cuDNN's ragged layout: segment ids -> per-document lengths and offsets.

A row of T tokens holds documents as contiguous runs of equal segment ids (what
the packers emit; trailing padding is one more run). cuDNN's packed ("THD")
attention describes row b by `seqlen_BM[b, m]`, the length of its m-th run, and
`offsets_BM1[b, m]`, the row index where that run starts; both are -1 past the
row's last run, M is a static cap on runs per row, and the last offsets column
is always -1 (the form `fused_attention_stablehlo.dot_product_attention` takes).
The side inputs are O(B*M) integers; computing them costs one cumsum, two
scatters and one sort per row, O(T log T).

`fits_B[b]` says the layout describes row b exactly: at most M runs, and no
segment id used by two runs (the masking rule lets equal ids attend across a
gap, which per-run lengths cannot express). Callers send rows that do not fit
to a kernel that reads segment ids directly.

Legend: B batch, T length, M max documents (runs) per row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PackedLayout(NamedTuple):
  seqlen_BM: jax.Array  # int32 run lengths, -1 past the last run
  offsets_BM1: jax.Array  # int32 run starts, -1 past the last run and in column M
  fits_B: jax.Array  # bool: the two arrays above describe the row exactly


def run_ids(segment_ids_BT):
  """Index of each token's run within its row: [B, T] int32, starting at 0."""
  b = segment_ids_BT.shape[0]
  changed_BT = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
  )
  return jnp.cumsum(changed_BT, axis=1, dtype=jnp.int32) - 1


def ids_are_contiguous(segment_ids_BT, run_BT):
  """[B] bool: no segment id appears in two different runs of its row."""
  seg_sorted, run_sorted = jax.lax.sort((segment_ids_BT, run_BT), dimension=1, num_keys=2)
  reused = (seg_sorted[:, 1:] == seg_sorted[:, :-1]) & (run_sorted[:, 1:] != run_sorted[:, :-1])
  return ~jnp.any(reused, axis=1)


def packed_layout(segment_ids_BT, max_segments: int) -> PackedLayout:
  """Per-run lengths and offsets of each row, capped at `max_segments` runs."""
  if max_segments < 2:
    raise ValueError(
      f"max_segments={max_segments} must be >= 2 (cuDNN's packed layout "
      "needs at least two documents per row)"
    )
  b, t = segment_ids_BT.shape
  m = max_segments
  run_BT = run_ids(segment_ids_BT)
  n_runs_B = run_BT[:, -1] + 1
  rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  pos_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  # Runs past the cap fall outside [0, M) and are dropped by the scatters.
  lengths_BM = jnp.zeros((b, m), jnp.int32).at[rows_BT, run_BT].add(1, mode="drop")
  starts_BM = jnp.full((b, m), t, jnp.int32).at[rows_BT, run_BT].min(pos_BT, mode="drop")
  valid_BM = jnp.arange(m)[None] < n_runs_B[:, None]
  seqlen_BM = jnp.where(valid_BM, lengths_BM, -1)
  offsets_BM1 = jnp.concatenate(
    [jnp.where(valid_BM, starts_BM, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1
  )
  fits_B = (n_runs_B <= m) & ids_are_contiguous(segment_ids_BT, run_BT)
  return PackedLayout(seqlen_BM, offsets_BM1, fits_B)


def decode_layout(layout: PackedLayout, t: int):
  """Per-token (run slot, index within the run) as cuDNN reads the layout.

  Returns `(slot_BT, local_BT)`; tokens no run covers get slot -1. Costs
  O(B*T*M): a portable check of the arithmetic, not a training path.
  """
  starts_BM = layout.offsets_BM1[:, :-1]
  valid_BM = layout.seqlen_BM >= 0
  pos_T = jnp.arange(t, dtype=jnp.int32)
  inside_BTM = (
    valid_BM[:, None]
    & (starts_BM[:, None] <= pos_T[None, :, None])
    & (pos_T[None, :, None] < (starts_BM + layout.seqlen_BM)[:, None])
  )
  covered_BT = jnp.any(inside_BTM, axis=-1)
  slot_BT = jnp.where(covered_BT, jnp.argmax(inside_BTM, axis=-1), -1).astype(jnp.int32)
  start_BT = jnp.take_along_axis(starts_BM, jnp.maximum(slot_BT, 0), axis=1)
  return slot_BT, pos_T[None] - start_BT
