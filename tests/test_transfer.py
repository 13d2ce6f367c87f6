"""The disaggregated layout and the device-to-device weight sync (`parallel.transfer`),
on the 8 simulated CPU devices; the two-process form runs in tests/test_rl_disagg.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.model import tiny
from cwm_jax.model.transformer import abstract_model
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding, transfer


def test_split_errors_name_what_does_not_divide():
  assert transfer.split_errors(8, 2, 4, 2, rollout_rows=8) == []
  assert transfer.split_errors(256, 64, 128, 4, rollout_rows=128) == []
  assert "24 rollout replicas" in transfer.split_errors(256, 64, 192, 8, rollout_rows=128)[0]
  assert "(0, 8)" in transfer.split_errors(8, 1, 8, 1, 8)[0]
  assert any("multiple of the" in e for e in transfer.split_errors(8, 1, 3, 1, 3))
  assert any("split evenly" in e for e in transfer.split_errors(8, 2, 3, 1, 6))
  assert any("replicas" in e for e in transfer.split_errors(8, 1, 4, 2, rollout_rows=3))
  assert any("rollout_tensor=3" in e for e in transfer.split_errors(8, 1, 4, 3, 6))


@pytest.mark.parametrize("rollout,tensor", [(4, 2), (4, 1), (6, 2)])
def test_layout_pairs_trainer_and_group_devices_on_one_process(rollout, tensor):
  trainer, by_process = transfer.split_devices(rollout)
  assert len(trainer) == 8 - rollout and not set(trainer) & {d for p in by_process for d in p}
  lay = transfer.layout(trainer, by_process, tensor)
  assert lay.mesh.devices.size == rollout and lay.replicas == rollout // tensor
  assert dict(lay.mesh.shape) == {
    "data": rollout // tensor,
    "fsdp": 1,
    "tensor": tensor,
    "sequence": 1,
  }
  for group in lay.groups:
    for idx, t in np.ndenumerate(lay.staging.devices):
      assert group[idx].process_index == t.process_index
  flat = [d for g in lay.groups for d in g.flat]
  assert sorted(d.id for d in flat) == sorted(d.id for p in by_process for d in p)


def test_weight_sync_copies_every_param_into_the_rollout_layout():
  cfg = tiny(n_layers=2)
  trainer, by_process = transfer.split_devices(4)
  train_mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 2}, trainer)
  specs = sharding.param_specs(cfg, sharding.DEFAULT_RULES)
  abstract = nnx.to_pure_dict(nnx.split(abstract_model(cfg), nnx.Param)[1])
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
  params = jax.device_put(host, sharding.named(train_mesh, specs))
  lay = transfer.layout(trainer, by_process, tensor=2)
  sync = transfer.WeightSync(lay, specs, jnp.bfloat16)
  out = sync(params, version=3)
  assert sync.version == 3
  rspecs = transfer.rollout_specs(specs)
  for got, want, spec in zip(
    jax.tree.leaves(out),
    jax.tree.leaves(host),
    jax.tree.leaves(rspecs, is_leaf=lambda x: isinstance(x, P)),
  ):
    assert got.dtype == jnp.bfloat16
    assert got.sharding == NamedSharding(lay.mesh, spec)
    assert set(got.sharding.device_set) == set(lay.mesh.devices.flat)
    np.testing.assert_array_equal(
      np.asarray(got, np.float32), want.astype(jnp.bfloat16).astype(np.float32)
    )
  # The trainer's params are untouched and still live on the trainer devices only.
  assert all(set(x.sharding.device_set) == set(trainer) for x in jax.tree.leaves(params))
  # Bytes the rollout devices receive: every device its tensor shard of each param.
  expect = sum(
    np.prod(a.shape) * 2 // (2 if "tensor" in tuple(s) else 1) * 4
    for a, s in zip(
      jax.tree.leaves(abstract), jax.tree.leaves(rspecs, is_leaf=lambda x: isinstance(x, P))
    )
  )
  assert transfer.sync_bytes(abstract, rspecs, dict(lay.mesh.shape), jnp.bfloat16) == expect
