"""Orbax checkpoints: `WORKDIR/checkpoints/<step>/{state,data,meta}`.

`state` is the train-state pytree {'params', 'opt_state', 'step', 'rng'} (or
{'params'} for a params-only checkpoint); `data` is the data-iterator state
(grain's handler for grain iterators, JSON otherwise); `meta` is JSON
{'model': ModelConfig as dict, 'config': run config dict}. Restoring onto a
target whose leaves carry other shardings reshards.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cwm_jax import storage
from cwm_jax.base import ConfigError
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


class _RestoreNoise(logging.Filter):
  """Drops asyncio's after-the-fact reports of orbax restore tasks that failed on a corrupt
  checkpoint ('Task exception was never retrieved', 'Event loop is closed'): the failure is
  reported once, as `CorruptCheckpoint`, and the run falls back or stops."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info:
      text += "".join(traceback.format_exception(*record.exc_info))
    return not ("orbax" in text and ("never retrieved" in text or "loop is closed" in text))


logging.getLogger("asyncio").addFilter(_RestoreNoise())
_UNRAISABLE = sys.unraisablehook


def _quiet_closed_loop(unraisable) -> None:
  """orbax's restore threads may still post to the event loop of a restore that failed
  and closed it; Python reports that as an ignored exception with a traceback."""
  e = unraisable.exc_value
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
    return
  _UNRAISABLE(unraisable)


sys.unraisablehook = _quiet_closed_loop

COMMIT_FILE = "commit_success.txt"  # orbax writes it when a step's save has committed


class CorruptCheckpoint(ConfigError):
  """A committed checkpoint step that cannot be read; the message names its files."""


def complete_steps(directory: str) -> list[int]:
  """Steps under `directory` whose save committed, ascending; a step directory without
  orbax's commit marker (a killed save, an empty `70/`) is never among them."""
  return sorted(
    int(n) for n in step_dirs(directory) if storage.isfile(storage.join(directory, n, COMMIT_FILE))
  )


def step_dirs(directory: str) -> list[str]:
  """Names of the step directories under `directory` (committed or not)."""
  return [n for n in storage.listdir(directory) if n.isdigit()]


def _corrupt(directory: str, step: int, e: BaseException) -> CorruptCheckpoint:
  first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
  return CorruptCheckpoint(
    f"checkpoint {storage.join(directory, str(step))} is corrupt or "
    f"incomplete ({type(e).__name__}: {first[:400]}); restore it, or "
    "pick another step"
  )


class Checkpointer:
  """One orbax CheckpointManager holding train state, data state and meta.

  Only committed steps (`complete_steps`) count; reading a corrupt one raises
  `CorruptCheckpoint`. With `create=False` nothing is created on disk.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    create: bool = True,
  ):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def complete_steps(self) -> list[int]:
    return complete_steps(self.directory)

  def latest_step(self) -> int | None:
    steps = self.complete_steps()
    return steps[-1] if steps else None

  def set_aside(self, steps) -> list[str]:
    """Renames step directories (corrupt or uncommitted) to `<step>.bad-<time>` so that
    new saves can reuse their numbers; returns the new paths."""
    moved = []
    for step in steps:
      src = storage.join(self.directory, str(step))
      if storage.isdir(src):
        dst = f"{src}.bad-{int(time.time())}"
        storage.move_aside(src, dst)
        moved.append(dst)
    self._mgr.reload()
    return moved

  def save(self, step: int, state: dict, *, data_iter=None, meta: dict | None = None) -> None:
    """Starts a (possibly async) save; arrays are copied off-device before it returns."""
    items = {_STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[_DATA] = (
        grain.checkpoint.CheckpointSave(data_iter)
        if _is_grain(data_iter)
        else ocp.args.JsonSave(data_iter.get_state())
      )
    if meta is not None:
      items[_META] = ocp.args.JsonSave(meta)
    self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

  def meta(self, step: int) -> dict:
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[
        _META
      ]
    except Exception as e:  # pylint: disable=broad-except  (any read failure: corrupt files)
      raise _corrupt(self.directory, step, e) from e
    if not isinstance(out, dict) or not isinstance(out.get("model"), dict):
      raise CorruptCheckpoint(
        f"checkpoint {storage.join(self.directory, str(step))}: meta "
        "holds no model config; is this a cwm_jax checkpoint?"
      )
    return out

  def restore(self, step: int, target: dict, *, data_iter=None, partial: bool = False) -> dict:
    """Restores `state` onto `target` (ShapeDtypeStructs with shardings); sets `data_iter`.

    `partial=True` restores only the keys present in `target` (e.g. {'params'}).
    """
    items = {
      _STATE: ocp.args.PyTreeRestore(
        target, restore_args=_restore_args(target), partial_restore=partial
      )
    }
    if data_iter is not None:
      items[_DATA] = (
        grain.checkpoint.CheckpointRestore(data_iter)
        if _is_grain(data_iter)
        else ocp.args.JsonRestore()
      )
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (any read failure: corrupt files)
      raise _corrupt(self.directory, step, e) from e
    if data_iter is not None and not _is_grain(data_iter):
      data_iter.set_state(out[_DATA])
    return out[_STATE]

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()


def save_params_checkpoint(
  directory: str, cfg: ModelConfig, params: dict, step: int = 0, config: dict | None = None
) -> None:
  """Writes a params-only checkpoint `directory/<step>/{state,meta}`."""
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  ckpt.save(
    step, {"params": params}, meta={"model": model_config_to_dict(cfg), "config": config or {}}
  )
  ckpt.close()


def params_target(cfg: ModelConfig, shardings=None) -> dict:
  """ShapeDtypeStructs of the params (with `shardings`, a matching tree, if given)."""
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  if shardings is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), shapes)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
  )


def restore_params(
  directory: str, step: int | None = None, shardings=None
) -> tuple[ModelConfig, Any]:
  """(cfg, params) from a full or params-only checkpoint; numpy without `shardings`."""
  found = complete_steps(directory)
  if not found or (step is not None and step not in found):
    raise ConfigError(
      f"{directory}: no committed checkpoint step {'' if step is None else step}"
      f" (committed steps: {found}); pass a checkpoint directory or --step"
    )
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False, create=False)
  try:
    step = found[-1] if step is None else step
    try:
      cfg = model_config_from_dict(ckpt.meta(step)["model"])
    except (TypeError, ValueError, KeyError) as e:
      raise _corrupt(directory, step, e) from e
    state = ckpt.restore(step, {"params": params_target(cfg, shardings)}, partial=True)
    return cfg, state["params"]
  finally:
    ckpt.close()
