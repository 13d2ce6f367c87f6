"""Orbax checkpoint layout, params-only round trips, resharding, data state."""

import os

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from cwm_jax.checkpoint import manager
from cwm_jax.model.config import cwm_32b, tiny
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding
from cwm_jax.train.synthetic import SyntheticSource

CFG = tiny(n_layers=2, vocab_size=128, dim=32, ffn_dim=64)


def _random_params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: rng.standard_normal(a.shape).astype(a.dtype), manager.params_target(CFG)
  )


def test_model_config_round_trip():
  for cfg in (CFG, cwm_32b()):
    assert manager.model_config_from_dict(manager.model_config_to_dict(cfg)) == cfg


def test_params_checkpoint_round_trip_and_reshard(tmp_path):
  params = _random_params()
  manager.save_params_checkpoint(str(tmp_path), CFG, params, step=7)
  assert {"meta", "state"} <= set(os.listdir(tmp_path / "7"))
  cfg, got = manager.restore_params(str(tmp_path))
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, got, params)
  mesh = mesh_lib.make_mesh(dict(fsdp=4, tensor=2))
  shardings = sharding.named(mesh, sharding.param_specs(CFG, sharding.DEFAULT_RULES))
  _, got = manager.restore_params(str(tmp_path), step=7, shardings=shardings)
  wq = got["layers"]["attention"]["wq"]
  assert wq.sharding == shardings["layers"]["attention"]["wq"]
  assert wq.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, params)


def test_train_state_with_json_data_state_and_max_to_keep(tmp_path):
  ckpt = manager.Checkpointer(str(tmp_path), max_to_keep=2)
  src = SyntheticSource(batch_size=2, seq_len=16, vocab=50)
  state = {"params": _random_params(), "step": np.int32(0)}
  for step in (1, 2, 3):
    next(src)
    ckpt.save(step, {**state, "step": np.int32(step)}, data_iter=src, meta={"model": {}, "x": step})
  ckpt.wait()
  assert sorted(int(s) for s in os.listdir(tmp_path) if s.isdigit()) == [2, 3]
  assert ckpt.meta(3)["x"] == 3
  fresh = SyntheticSource(batch_size=2, seq_len=16, vocab=50)
  repl = NamedSharding(mesh_lib.make_mesh(dict(fsdp=-1)), jax.sharding.PartitionSpec())
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=repl), state
  )
  got = ckpt.restore(2, target, data_iter=fresh)
  assert int(got["step"]) == 2 and fresh.get_state()["index"] == 2
  ckpt.close()


def test_grain_iterator_state(tmp_path):
  ckpt = manager.Checkpointer(str(tmp_path), async_save=False)
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  for _ in range(3):
    next(it)
  ckpt.save(1, {"step": np.int32(1)}, data_iter=it)
  fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt.restore(1, {"step": jax.ShapeDtypeStruct((), np.int32)}, data_iter=fresh)
  assert next(fresh) == 3
  ckpt.close()
