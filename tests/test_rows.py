"""Rows of a global batch (`cwm_jax.parallel.rows`) on the 8 simulated CPU devices: the row
sharding, process-local rows to global arrays and back. The two-process train test
(`test_train_loop.test_two_processes_match_one`) runs the same helpers across processes."""

import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import rows, sharding

BATCH_AXES = ("data", "fsdp")


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=1, sequence=2))


@pytest.fixture(scope="module")
def batch_sharding(mesh):
  return NamedSharding(mesh, sharding.batch_spec(sharding.DEFAULT_RULES))


def _rows_held(array) -> dict[int, tuple[int, int]]:
  """Device id -> (first row, end row) of its shard."""
  return {s.device.id: (s.index[0].start or 0, s.index[0].stop) for s in array.addressable_shards}


def test_row_sharding_keeps_the_batch_axes_only(mesh, batch_sharding):
  assert batch_sharding.spec == P(BATCH_AXES, "sequence")
  per_row = rows.row_sharding(batch_sharding)
  assert per_row.mesh is mesh and per_row.spec == P(BATCH_AXES)
  assert rows.row_sharding(per_row).spec == per_row.spec  # a row sharding is its own
  assert rows.row_sharding(NamedSharding(mesh, P())).is_fully_replicated
  assert rows.row_blocks(batch_sharding) == rows.row_blocks(per_row) == 4  # data x fsdp
  assert rows.row_blocks(NamedSharding(mesh, P("sequence", "data"))) == 2
  assert rows.row_blocks(NamedSharding(mesh, P())) == 1


def test_global_batch_lays_out_tokens_and_per_row_values(batch_sharding):
  local = {
    "inputs": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
    "advantages": np.linspace(-1, 1, 8, dtype=np.float32),
  }
  out = rows.global_batch(local, batch_sharding, 8)
  assert set(out) == set(local)
  for k, v in local.items():
    np.testing.assert_array_equal(np.asarray(out[k]), v)
  assert out["inputs"].sharding == batch_sharding
  assert out["advantages"].sharding == rows.row_sharding(batch_sharding)
  # 4 blocks of 2 rows over data x fsdp; tokens also split in halves over sequence.
  assert {s.data.shape for s in out["inputs"].addressable_shards} == {(2, 3)}
  assert sorted(set(_rows_held(out["advantages"]).values())) == [(0, 2), (2, 4), (4, 6), (6, 8)]
  assert _rows_held(out["inputs"]) == _rows_held(out["advantages"])


def test_global_array_needs_the_global_row_count(batch_sharding):
  # One process holds every row: a row count other than its own is a mistake, not padding.
  with pytest.raises(ValueError):
    rows.global_array(np.zeros((8, 6), np.int32), batch_sharding, 16)


def test_local_rows_round_trips_in_row_order(mesh, batch_sharding):
  x = np.arange(8 * 6 * 2, dtype=np.float32).reshape(8, 6, 2)
  by_tokens = rows.global_array(x, batch_sharding, 8)  # rows and tokens split
  np.testing.assert_array_equal(rows.local_rows(by_tokens, batch_sharding), x)
  # Rows replicated over sequence: each block is taken once.
  by_rows = rows.global_array(x[:, 0, 0], rows.row_sharding(batch_sharding), 8)
  np.testing.assert_array_equal(rows.local_rows(by_rows, batch_sharding), x[:, 0, 0])
