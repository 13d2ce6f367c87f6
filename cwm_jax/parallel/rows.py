"""Rows of a global batch: the row sharding, and process-local rows to and from global arrays.

Every process of a multi-controller job loads only its own rows of a global batch. A
[B, ...] array's rows are split over the mesh axes of the first entry of a batch sharding
(the batch axes, `data` and `fsdp` under the default rules): `row_sharding` is that
layout with every other dim replicated (`row_blocks`: into how many blocks it splits the
rows). `global_array` and `global_batch` turn this process's rows into the global
`jax.Array`s the jitted steps take; `local_rows` hands this process its rows of a global
array back (e.g. sampled tokens to score on the host).

With one process the local rows are the whole batch and these are plain `device_put`s
and `device_get`s, so the same code runs on a laptop and on a pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def row_sharding(sharding: NamedSharding) -> NamedSharding:
  """The sharding of a [B, ...] array split by rows as `sharding` splits its first dim (a
  [B, T] batch sharding or a row sharding: the result is the same), other dims replicated."""
  first = sharding.spec[0] if len(sharding.spec) else None
  return NamedSharding(sharding.mesh, P(first))


def row_blocks(sharding: NamedSharding) -> int:
  """How many blocks `row_sharding(sharding)` splits the rows into (the product of the sizes
  of its batch axes): a global row count must be a multiple of it."""
  first = row_sharding(sharding).spec[0]
  axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def global_array(local: np.ndarray, sharding: NamedSharding, rows: int) -> jax.Array:
  """The global [rows, ...] array laid out by `sharding` whose rows on this process's
  devices are `local` [b, ...] (b = rows / process count when the rows span every process).

  `rows` is the global row count, the same on every process. When every process holds every
  row alike, pass them all and `rows=len(local)`: each device then takes its own block.
  Processes that hold the same rows (replicas over a non-batch mesh axis) must pass the
  same `local`."""
  return jax.make_array_from_process_local_data(sharding, local, (rows,) + local.shape[1:])


def global_batch(
  local: Mapping[str, np.ndarray], batch_sharding: NamedSharding, rows: int
) -> dict[str, jax.Array]:
  """This process's rows of a batch as global arrays: each [b, T, ...] array laid out by
  `batch_sharding`, each [b] array (a per-row value such as an advantage) by its
  `row_sharding`; `rows` is the global batch size."""
  per_row = row_sharding(batch_sharding)
  return {
    k: global_array(v, batch_sharding if v.ndim > 1 else per_row, rows) for k, v in local.items()
  }


def local_rows(array: jax.Array, sharding: NamedSharding) -> np.ndarray:
  """This process's rows of a global [B, ...] `array` (the inverse of `global_array` under
  `row_sharding(sharding)`), in row order; with one process, the whole array."""
  by_rows = jax.device_put(array, row_sharding(sharding))
  # Devices that replicate a block (over a non-batch axis) hold the same rows: one each.
  blocks = {s.index[0].start or 0: s.data for s in by_rows.addressable_shards}
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])
