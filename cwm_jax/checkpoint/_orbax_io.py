"""Streaming orbax I/O for conversion: write params one layer slice at a time, read them back.

Writing goes through `manager.save_params_checkpoint`, so the layout is the
training loop's (`<dir>/<step>/{state,meta}`); the params leaves are
`LazyArray`s whose registered handler fetches and writes each layer slice
into its own zarr shard (shard shape [1, ...] for stacked tensors), so only
one slice is in host memory. The on-disk data is an ordinary numpy array
entry that `restore_params` (or any orbax restore) reads.

Reading opens one params leaf with tensorstore and reads one layer at a time.
A checkpoint directory may be local or a URL (`gs://...`): files go through
`cwm_jax.storage`, tensors through tensorstore's own drivers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts
from absl import logging
from etils import epath
from orbax.checkpoint import type_handlers

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint import manager
from cwm_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """A params leaf produced on demand: fetch(i) gives layer i (or the whole
  tensor, fetch(None), when not stacked)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[int | None], np.ndarray]
  stacked: bool

  @property
  def ndim(self) -> int:  # orbax inspects leaves like arrays
    return len(self.shape)


def _block_rows(shape: tuple[int, ...], itemsize: int, max_bytes: int = 64 * 2**20) -> int:
  """Largest divisor of shape[0] whose row block fits in max_bytes (at least 1 row)."""
  row = itemsize * math.prod(shape[1:])
  fits = [r for r in range(1, shape[0] + 1) if shape[0] % r == 0 and r * row <= max_bytes]
  return max(fits, default=1)


class _LazyArrayHandler(type_handlers.NumpyHandler):
  """Writes LazyArray leaves one slice at a time; stored as plain numpy arrays.

  Stacked leaves get one zarr shard per layer; other leaves are written in row
  blocks of <= 64 MiB so tensorstore never buffers a whole large tensor.
  """

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _write(self, value: LazyArray, info, arg) -> None:
    await info.await_path_creation()
    rows = 1 if value.stacked else _block_rows(value.shape, np.dtype(value.dtype).itemsize)
    local = (rows, *value.shape[1:])
    spec = type_handlers.get_json_tspec_write(
      info,
      use_ocdbt=info.is_ocdbt_checkpoint,
      global_shape=value.shape,
      local_shape=local,
      dtype=np.dtype(value.dtype),
      process_index=0,
      arg=arg,
    )
    t = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
    whole = None if value.stacked else value.fetch(None)
    for i in range(0, value.shape[0], rows):
      data = value.fetch(i)[None] if value.stacked else whole[i : i + rows]
      if data.shape != local or data.dtype != value.dtype:
        raise ValueError(
          f"{info.name}[{i}]: got {data.shape} {data.dtype}, expected {local} {value.dtype}"
        )
      await t[i : i + rows].write(data, can_reference_source_data_indefinitely=True)

  async def serialize(self, values, infos, args=None):
    args = args or [type_handlers.SaveArgs()] * len(values)
    for value, info, arg in zip(values, infos, args):
      await self._write(value, info, arg)
    return []


def save_streaming(
  directory: str, cfg: ModelConfig, params: dict, step: int, config: dict[str, Any]
) -> None:
  """A params-only checkpoint `directory/<step>/` from a tree of LazyArray."""
  if not type_handlers.has_type_handler(LazyArray):
    # Shares the 'np.ndarray' typestr (so restores see plain numpy entries); reading
    # is NumpyHandler's, inherited unchanged.
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns of the (intended) np.ndarray collision
    try:
      type_handlers.register_type_handler(LazyArray, _LazyArrayHandler(), override=True)
    finally:
      logging.set_verbosity(level)
  manager.save_params_checkpoint(directory, cfg, params, step=step, config=config)


def checkpoints_dir(directory: str) -> str:
  """The orbax manager directory: `directory` or `directory/checkpoints`."""
  sub = storage.join(directory, "checkpoints")
  return sub if storage.isdir(sub) else directory


def steps(directory: str) -> list[int]:
  """Committed steps holding a `state` item (uncommitted step directories are skipped)."""
  return [
    n
    for n in manager.complete_steps(directory)
    if storage.isdir(storage.join(directory, str(n), "state"))
  ]


def _read_json(path: str) -> Any:
  """A checkpoint's JSON file; a missing or unparsable one is a ConfigError naming it."""
  try:
    return storage.read_json(path)
  except FileNotFoundError:
    raise ConfigError(
      f"checkpoint file {path} is missing: the checkpoint is incomplete; "
      "restore it or pick another step"
    ) from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ConfigError(
      f"checkpoint file {path} is corrupt ({e}); restore it or pick another step"
    ) from None


class OrbaxReader:
  """Params of one orbax checkpoint, read one leaf slice at a time."""

  def __init__(self, directory: str, step: int | None = None):
    root = checkpoints_dir(storage.absolute(directory))
    found = steps(root)
    if not found:
      raise ConfigError(f"{directory}: no orbax checkpoint steps (<step>/state) found")
    if step is not None and step not in found:
      raise ConfigError(f"{directory}: no committed step {step}; pass --step with one of {found}")
    self.step = found[-1] if step is None else step
    step_dir = storage.join(root, str(self.step))
    meta_path, tree_path = (
      storage.join(step_dir, "meta", "metadata"),
      storage.join(step_dir, "state", "_METADATA"),
    )
    self.meta, tree = _read_json(meta_path), _read_json(tree_path)
    try:
      self.cfg = manager.model_config_from_dict(self.meta["model"])
    except (TypeError, KeyError, ValueError) as e:
      raise ConfigError(
        f"checkpoint file {meta_path} holds no valid model config ({e!r}); "
        "is this a cwm_jax checkpoint?"
      ) from None
    self._state_dir = epath.Path(step_dir) / "state"
    try:
      self._ocdbt, self._zarr3 = tree.get("use_ocdbt", True), tree.get("use_zarr3", False)
      self._keys = [
        tuple(k["key"] for k in v["key_metadata"]) for v in tree["tree_metadata"].values()
      ]
    except (AttributeError, TypeError, KeyError) as e:
      raise ConfigError(
        f"checkpoint file {tree_path} is not orbax tree metadata ({e!r}); "
        "restore it or pick another step"
      ) from None
    self._context = type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
    self._open: dict[tuple[str, ...], Any] = {}  # only the last leaf stays open
    self.root = root

  def paths(self) -> list[tuple[str, ...]]:
    """Paths (without the leading 'params') of every params leaf."""
    return sorted(k[1:] for k in self._keys if k[0] == "params")

  def _store(self, path: tuple[str, ...]):
    if path not in self._open:
      info = type_handlers.ParamInfo(
        name=".".join(("params", *path)),
        parent_dir=self._state_dir,
        is_ocdbt_checkpoint=self._ocdbt,
        use_zarr3=self._zarr3,
        ts_context=self._context,
      )
      spec = type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      try:
        self._open = {path: ts.open(ts.Spec(spec), open=True, context=self._context).result()}
      except ValueError as e:
        raise self._corrupt(path, e) from None
    return self._open[path]

  def _corrupt(self, path, e: BaseException) -> ConfigError:
    first = next((l for l in str(e).splitlines() if l.strip()), "")
    return ConfigError(
      f"checkpoint {self._state_dir} is corrupt: params/{'/'.join(path)} cannot "
      f"be read ({first[:400]}); restore it or pick another step"
    )

  def shape(self, path) -> tuple[int, ...]:
    return tuple(self._store(path).shape)

  def dtype(self, path) -> np.dtype:
    return np.dtype(self._store(path).dtype.numpy_dtype)

  def read(self, path, layer: int | None) -> np.ndarray:
    t = self._store(path)
    try:
      return (t if layer is None else t[layer]).read().result()
    except ValueError as e:
      raise self._corrupt(path, e) from None
