"""Meta PyTorch CWM checkpoints: params.json <-> ModelConfig, DCP read and streamed write.

Meta's release is `params.json` (architecture under "model") plus a
torch.distributed.checkpoint (DCP) directory whose tensors are named
`model.<name>` (Meta's Checkpointer saves {"model": module}); names without
the prefix are accepted too. DCP's `.metadata` file is a pickle: it is read
with an allow-list unpickler, never with plain `pickle.load`.

A directory to read may be a URL (`gs://...`): torch's DCP reader needs local files,
so it reads a local folder of hard links to the files' cached copies
(`storage.local_copy`).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.model.config import ModelConfig, RopeScaling

PREFIX = "model."


def ffn_hidden_meta(
  dim: int, ffn_exp: int, multiple_of: int, ffn_dim_multiplier: float | None
) -> int:
  """Meta's FeedForward size rule, as in its code (int() before rounding up)."""
  hidden = int(2 * ffn_exp * dim / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_fields(dim: int, ffn_dim: int) -> dict[str, Any]:
  """(ffn_exp, multiple_of, ffn_dim_multiplier) that reproduce `ffn_dim` exactly."""
  base = int(2 * 4 * dim / 3)
  multiple_of = math.gcd(ffn_dim, 256)
  for mult in (ffn_dim / base, (ffn_dim + 0.5) / base, (ffn_dim - multiple_of / 2) / base):
    if ffn_hidden_meta(dim, 4, multiple_of, mult) == ffn_dim:
      return {"ffn_exp": 4, "multiple_of": multiple_of, "ffn_dim_multiplier": mult}
  raise ConfigError(f"no Meta FFN parameters give ffn_dim={ffn_dim} for dim={dim}")


def _window_fields(cfg: ModelConfig) -> dict[str, Any]:
  """window_attn that reproduces cfg.layer_windows, with an explicit list if irregular."""
  g, windows = cfg.global_window, list(cfg.layer_windows)
  local = sorted({w for w in windows if w < g})
  out: dict[str, Any] = {"global_window": g, "local_window": local[0] if local else g}
  if len(local) <= 1:
    for pattern in range(1, cfg.n_layers + 1):
      for last in (True, False):
        if _meta_windows(cfg.n_layers, out["local_window"], g, pattern, last) == windows:
          return {**out, "window_pattern": pattern, "global_last_layer": last}
  # Not expressible by Meta's rule: our explicit per-layer extension.
  return {**out, "window_pattern": 1, "global_last_layer": True, "layer_windows": windows}


def _meta_windows(n_layers, local, glob, pattern, global_last_layer) -> list[int]:
  return [
    glob if (global_last_layer and i == n_layers - 1) or i % pattern == 0 else local
    for i in range(n_layers)
  ]


def config_to_meta(cfg: ModelConfig) -> dict[str, Any]:
  """params.json dict ({"model": TransformerArgs fields}) for `cfg`."""
  model = {
    "dim": cfg.dim,
    "n_layers": cfg.n_layers,
    "n_heads": cfg.n_heads,
    "n_kv_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "vocab_size": cfg.vocab_size,
    "max_seq_len": cfg.max_seq_len,
    "norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    **_ffn_fields(cfg.dim, cfg.ffn_dim),
    "weight_tying": False,
    "pos_embed_impl": "rope" if cfg.rope_scaling is None else "scaled_rope",
    "window_attn": _window_fields(cfg),
  }
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    model["scaled_rope"] = {
      "scale_factor": s.factor,
      "old_context_len": s.original_context,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
    }
  return {"model": model}


def config_from_meta(params: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from a params.json dict (the "model" section or the bare fields)."""
  m = params.get("model", params)
  missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in m]
  if missing:
    raise ConfigError(f"params.json lacks {missing}; is this a Meta CWM params.json?")
  if m.get("weight_tying") or m.get("kv_lora_rank") or m.get("qk_norm") or m.get("qkv_biases"):
    raise ConfigError("params.json asks for weight tying, MLA, QK norm or biases; CWM has none")
  n_layers, max_seq = m["n_layers"], int(m.get("max_seq_len", 131072))
  w = m.get("window_attn") or {}
  glob = int(w.get("global_window") or max_seq)
  if "layer_windows" in w:
    windows = [int(x) for x in w["layer_windows"]]
  elif w:
    local = int(w.get("local_window") or glob)
    windows = _meta_windows(
      n_layers, local, glob, int(w.get("window_pattern", 6)), bool(w.get("global_last_layer", True))
    )
  else:
    windows = [glob] * n_layers
  impl, scaling = m.get("pos_embed_impl", "rope"), None
  if impl == "scaled_rope":
    s = m.get("scaled_rope") or {}
    scaling = RopeScaling(
      factor=float(s.get("scale_factor", 8)),
      low_freq_factor=float(s.get("low_freq_factor", 1)),
      high_freq_factor=float(s.get("high_freq_factor", 4)),
      original_context=int(s.get("old_context_len", 8192)),
    )
  elif impl != "rope":
    raise ConfigError(f"params.json pos_embed_impl={impl!r}; expected 'rope' or 'scaled_rope'")
  fields = dict(
    vocab_size=m["vocab_size"],
    dim=m["dim"],
    n_layers=n_layers,
    n_heads=m["n_heads"],
    n_kv_heads=m.get("n_kv_heads") or m["n_heads"],
    head_dim=m.get("head_dim") or m["dim"] // m["n_heads"],
    ffn_dim=ffn_hidden_meta(
      m["dim"],
      int(m.get("ffn_exp", 4)),
      int(m.get("multiple_of", 256)),
      m.get("ffn_dim_multiplier"),
    ),
    layer_windows=tuple(windows),
    global_window=glob,
    norm_eps=float(m.get("norm_eps", 1e-5)),
    rope_theta=float(m.get("rope_theta", 10000.0)),
    rope_scaling=scaling,
    max_seq_len=max_seq,
  )
  fields.update(overrides)
  return ModelConfig(**fields)


class _MetadataUnpickler(pickle.Unpickler):
  """Unpickles DCP `.metadata`, allowing only the classes DCP metadata is built of."""

  _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
  _NAMES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
  }

  def find_class(self, module, name):
    torch = _require_torch()
    allowed = (
      (module, name) in self._NAMES
      or module in self._MODULES
      or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
    )
    if not allowed:
      raise ConfigError(
        f"DCP .metadata refers to {module}.{name}, which is not DCP metadata; "
        "refusing to unpickle it"
      )
    return super().find_class(module, name)


def _require_torch():
  """torch (needed only for Meta's DCP format), or a clear error."""
  try:
    import torch
  except ImportError:
    raise ConfigError("the Meta (DCP) format needs PyTorch: pip install torch") from None
  return torch


def _np_dtype(torch_dtype) -> np.dtype:
  torch = _require_torch()
  table = {
    torch.float32: np.dtype("float32"),
    torch.float16: np.dtype("float16"),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype("float64"),
  }
  if torch_dtype not in table:
    raise ConfigError(f"DCP tensor dtype {torch_dtype} is not a float type CWM uses")
  return table[torch_dtype]


def _numpy(t) -> np.ndarray:
  torch = _require_torch()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _torch(a: np.ndarray):
  torch = _require_torch()
  a = np.ascontiguousarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


class DcpReader:
  """Lazy access to the tensors of a DCP directory, under names without 'model.'."""

  def __init__(self, directory: str):
    _require_torch()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = storage.join(directory, ".metadata")
    if not storage.exists(path):
      raise ConfigError(f"{directory} has no DCP .metadata file")
    md = _load_metadata(path)
    self.directory = directory
    # What torch reads: the directory itself, or for a URL a local folder of links to
    # its files' cached copies (removed with this reader).
    self._local = directory
    if storage.is_url(directory):
      self._local = _local_mirror(directory, md)
      weakref.finalize(self, shutil.rmtree, self._local, True)
    _check_storage(directory, md, self._local)
    self._meta = {
      k[len(PREFIX) :] if k.startswith(PREFIX) else k: (k, v)
      for k, v in md.state_dict_metadata.items()
      if isinstance(v, TensorStorageMetadata)
    }

  def names(self) -> list[str]:
    return sorted(self._meta)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._meta[name][1].size)

  def dtype(self, name: str) -> np.dtype:
    return _np_dtype(self._meta[name][1].properties.dtype)

  def get(self, name: str) -> np.ndarray:
    """One tensor; only its bytes are read."""
    torch = _require_torch()
    import torch.distributed.checkpoint as dcp

    key, md = self._meta[name]
    out = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
    try:
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(out, storage_reader=_safe_reader(self._local), no_dist=True)
    except Exception as e:  # pylint: disable=broad-except  (torch's errors for damaged files)
      first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
      raise ConfigError(
        f"DCP checkpoint {self.directory}: reading {name} failed ({first[:300]});"
        " a .distcp file is damaged: re-download or re-convert it"
      ) from None
    return _numpy(out[key])


def _load_metadata(path: str):
  """DCP `.metadata` (a local path or URL) through the allow-list unpickler; garbage is a
  ConfigError naming it."""
  try:
    with storage.open_file(path, "rb") as f:
      md = _MetadataUnpickler(f).load()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any unpickling failure)
    raise ConfigError(
      f"DCP metadata file {path} is corrupt ({type(e).__name__}: {e}); "
      "re-download or re-convert the checkpoint"
    ) from None
  if not hasattr(md, "state_dict_metadata"):
    raise ConfigError(f"DCP metadata file {path} holds {type(md).__name__}, not DCP metadata")
  return md


def _data_files(md) -> list[str]:
  """The data files (relative paths) `.metadata` points at."""
  return sorted(
    {
      str(getattr(info, "relative_path", ""))
      for info in (getattr(md, "storage_data", None) or {}).values()
    }
  )


def _local_mirror(directory: str, md) -> str:
  """A temporary local folder holding `.metadata` and every data file of the DCP
  directory `directory` (a URL) as hard links to their cached copies, so that the
  cache evicting a copy cannot pull a file from under the reader; a data file that is
  missing is left out (for `_check_storage` to name)."""
  root = storage.cache_dir()
  os.makedirs(root, exist_ok=True)
  local = tempfile.mkdtemp(dir=root, prefix=".dcp-")  # dot names: never evicted
  try:
    for rel in (".metadata", *_data_files(md)):
      if not rel or os.path.isabs(rel) or ".." in rel.split("/"):
        continue  # only files inside the directory; `_check_storage` names the bad entry
      try:
        cached = storage.local_copy(storage.join(directory, *rel.split("/")))
      except FileNotFoundError:
        continue
      target = os.path.join(local, *rel.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      try:
        os.link(cached, target)
      except OSError:  # a file system without hard links
        shutil.copyfile(cached, target)
  except BaseException:
    shutil.rmtree(local, ignore_errors=True)
    raise
  return local


def _check_storage(directory: str, md, local: str | None = None) -> None:
  """Every byte range `.metadata` points at exists: a missing or truncated .distcp file
  is a ConfigError naming it (under `directory`), before any tensor is read. Sizes are
  those of the files under `local` (default: `directory`)."""
  local = local or directory
  sizes: dict[str, int] = {}
  for info in (getattr(md, "storage_data", None) or {}).values():
    rel = str(getattr(info, "relative_path", ""))
    path, here = storage.join(directory, rel), os.path.join(local, rel)
    if rel not in sizes:
      sizes[rel] = os.path.getsize(here) if os.path.isfile(here) else -1
    if sizes[rel] < 0:
      raise ConfigError(f"DCP checkpoint file {path} is missing; re-download or re-convert")
    end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
    if end > sizes[rel]:
      raise ConfigError(
        f"DCP checkpoint file {path} is truncated ({sizes[rel]} bytes, data "
        f"up to byte {end}); re-download or re-convert it"
      )


def _safe_reader(directory: str):
  """FileSystemReader whose metadata goes through the allow-list unpickler."""
  from torch.distributed.checkpoint import FileSystemReader
  from torch.distributed.checkpoint.metadata import StorageMeta

  class Reader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
      md = _load_metadata(os.path.join(directory, ".metadata"))
      if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
      md.storage_meta.load_id = self.load_id
      return md

  return Reader(directory)


def write_dcp(directory: str, specs, fetch: Callable[[str], np.ndarray]) -> None:
  """Streams tensors into a local DCP directory, one file per tensor, names under 'model.'.

  `specs` are (name, shape, dtype); `fetch(name)` produces one tensor when DCP
  writes it, so only one tensor is in memory at a time. torch's writer needs a local
  folder: conversion to a URL stages there and uploads (`storage.publish_dir`).
  """
  if storage.is_url(directory):
    raise ValueError(
      f"write_dcp writes a local folder, not {directory!r}; stage it locally "
      "and publish it with storage.publish_dir"
    )
  torch = _require_torch()
  import torch.distributed.checkpoint as dcp
  from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

  class LazyPlanner(DefaultSavePlanner):
    def resolve_data(self, write_item):
      return _torch(fetch(write_item.index.fqn[len(PREFIX) :]))

  state = {
    PREFIX + name: torch.empty(tuple(shape), dtype=_torch(np.zeros(0, dtype)).dtype, device="meta")
    for name, shape, dtype in specs
  }
  writer = dcp.FileSystemWriter(directory, single_file_per_rank=False, thread_count=1)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    dcp.save(state, storage_writer=writer, planner=LazyPlanner(), no_dist=True)
