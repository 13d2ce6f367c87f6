"""Orbax checkpoints: `WORKDIR/checkpoints/<step>/{state,data,meta}`.

`state` is the train-state pytree {'params', 'opt_state', 'step', 'rng'} (or
{'params'} for a params-only checkpoint); `data` is the data-iterator state
(grain's handler for grain iterators, JSON otherwise); `meta` is JSON
{'model': ModelConfig as dict, 'config': run config dict}. Restoring onto a
target whose leaves carry other shardings reshards.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
from flax import nnx
import numpy as np
import orbax.checkpoint as ocp

from cwm_jax.model.config import ModelConfig
from cwm_jax.model.transformer import abstract_model

_STATE, _DATA, _META = "state", "data", "meta"


def model_config_to_dict(cfg: ModelConfig) -> dict:
  """The architecture as stored in checkpoint metadata (no execution choices)."""
  d = cfg.to_dict()
  d["layer_windows"] = list(cfg.layer_windows)
  return d


def model_config_from_dict(d: dict) -> ModelConfig:
  """Reads checkpoint metadata, including that of checkpoints written before the
  architecture/execution split (their execution fields are ignored)."""
  return ModelConfig.from_dict(d)


def _is_grain(it) -> bool:
  return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


def _restore_args(target):
  """Per-leaf restore args: arrays with the target's sharding, else numpy."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
      return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray)
  return jax.tree.map(one, target)


class Checkpointer:
  """One orbax CheckpointManager holding train state, data state and meta."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: dict, *, data_iter=None, meta: dict | None = None) -> None:
    """Starts a (possibly async) save; arrays are copied off-device before it returns."""
    items = {_STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[_DATA] = (grain.checkpoint.CheckpointSave(data_iter) if _is_grain(data_iter)
                      else ocp.args.JsonSave(data_iter.get_state()))
    if meta is not None:
      items[_META] = ocp.args.JsonSave(meta)
    self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

  def meta(self, step: int) -> dict:
    return self._mgr.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))[_META]

  def restore(self, step: int, target: dict, *, data_iter=None, partial: bool = False) -> dict:
    """Restores `state` onto `target` (ShapeDtypeStructs with shardings); sets `data_iter`.

    `partial=True` restores only the keys present in `target` (e.g. {'params'}).
    """
    items = {_STATE: ocp.args.PyTreeRestore(target, restore_args=_restore_args(target),
                                            partial_restore=partial)}
    if data_iter is not None:
      items[_DATA] = (grain.checkpoint.CheckpointRestore(data_iter) if _is_grain(data_iter)
                      else ocp.args.JsonRestore())
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and not _is_grain(data_iter):
      data_iter.set_state(out[_DATA])
    return out[_STATE]

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()


def save_params_checkpoint(directory: str, cfg: ModelConfig, params: dict, step: int = 0,
                           config: dict | None = None) -> None:
  """Writes a params-only checkpoint `directory/<step>/{state,meta}`."""
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  ckpt.save(step, {"params": params},
            meta={"model": model_config_to_dict(cfg), "config": config or {}})
  ckpt.close()


def params_target(cfg: ModelConfig, shardings=None) -> dict:
  """ShapeDtypeStructs of the params (with `shardings`, a matching tree, if given)."""
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  if shardings is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), shapes)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def restore_params(directory: str, step: int | None = None, shardings=None
                   ) -> tuple[ModelConfig, Any]:
  """(cfg, params) from a full or params-only checkpoint; numpy without `shardings`."""
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    cfg = model_config_from_dict(ckpt.meta(step)["model"])
    state = ckpt.restore(step, {"params": params_target(cfg, shardings)}, partial=True)
    return cfg, state["params"]
  finally:
    ckpt.close()
