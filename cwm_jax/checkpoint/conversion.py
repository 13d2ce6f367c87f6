"""Streaming checkpoint conversion between orbax, Hugging Face and Meta (DCP).

Every source is viewed as per-layer tensors in our layout (`Source.read(path,
layer)`); every writer pulls them one at a time, so host memory stays near
one tensor (plus its transformed copy) whatever the model size. Sources are
validated against their config (names, shapes, dtypes) before anything is
written.

Source and destination may be local or URLs (`gs://...`); every file goes through
`cwm_jax.storage`. Output is written into a staging folder that becomes the
destination only when complete: locally a hidden `.DST.partial-PID` folder beside it,
renamed into place; for a URL a local folder uploaded with the file readers check
(`marker`) last, so a conversion that fails midway leaves no checkpoint readers
would accept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint import _orbax_io, hf, hf_tokenizer, manager, meta
from cwm_jax.checkpoint.names import HF, META, Entry, locate
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.model.config import ModelConfig

FORMATS = ("orbax", "hf", "meta")
DTYPES = {"float32": np.dtype("float32"), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
Path = tuple[str, ...]


class ConvertError(ConfigError):
  """A checkpoint cannot be converted as asked; the message says why and what to do."""


def detect_format(directory: str) -> str:
  """'hf', 'meta' or 'orbax', from the files in `directory`."""
  if not storage.isdir(directory):
    raise ConvertError(f"source {directory!r} does not exist or is not a directory")
  names = set(storage.listdir(directory))
  if "config.json" in names and any(n.endswith(".safetensors") for n in names):
    return "hf"
  if "params.json" in names and ".metadata" in names:
    return "meta"
  if _orbax_io.steps(_orbax_io.checkpoints_dir(directory)):
    return "orbax"
  raise ConvertError(
    f"{directory!r} is not a Hugging Face (config.json + *.safetensors), "
    "Meta (params.json + DCP .metadata) or orbax (<step>/state) checkpoint"
  )


def expected_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
  """Our param paths and full (stacked) shapes for `cfg`."""
  flat = jax.tree_util.tree_flatten_with_path(manager.params_target(cfg))[0]
  return {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in flat}


class Source:
  """A checkpoint seen as our per-layer tensors: read(path, layer) in the source dtype."""

  def __init__(
    self,
    fmt: str,
    cfg: ModelConfig,
    read: Callable,
    dtypes: dict[Path, np.dtype],
    token_ids: dict[str, Any],
    tokenizer_files: list[str],
    step: int | None = None,
    run_config: dict | None = None,
  ):
    self.fmt, self.cfg, self.read, self.dtypes = fmt, cfg, read, dtypes
    self.token_ids, self.tokenizer_files, self.step = token_ids, tokenizer_files, step
    self.run_config = run_config or {}  # an orbax checkpoint's training config


def _check_external(directory, entries, store, cfg, declared: np.dtype | None):
  """Names, shapes and dtypes of an HF/Meta store against `cfg`; per-path dtypes."""
  where = locate(entries, cfg)
  present = set(store.names())
  missing, extra = sorted(set(where) - present), sorted(present - set(where))
  if missing or extra:
    raise ConvertError(
      f"{directory}: tensors missing {missing[:5]} ({len(missing)} in all), "
      f"unexpected {extra[:5]} ({len(extra)} in all) for the config's "
      f"{cfg.n_layers} layers; is the config from the same checkpoint?"
    )
  dtypes: dict[Path, np.dtype] = {}
  for name, (e, _) in where.items():
    shape, dtype = store.shape(name), store.dtype(name)
    if shape != e.shape(cfg):
      raise ConvertError(
        f"{directory}: {name} has shape {shape}; the config implies {e.shape(cfg)}"
      )
    if declared is not None and dtype != declared:
      raise ConvertError(f"{directory}: {name} is {dtype} but the config declares {declared}")
    dtypes[e.ours] = dtype
  return dtypes


def _external_reader(entries: tuple[Entry, ...], store, cfg):
  by_path = {e.ours: e for e in entries}

  def read(path: Path, layer: int | None) -> np.ndarray:
    e = by_path[path]
    return e.to_ours(store.get(e.theirs.format(i=layer) if e.stacked else e.theirs), cfg)

  return read


def _files(directory: str, names) -> list[str]:
  """The files among `names` that exist in `directory`, as paths."""
  present = set(storage.listdir(directory))
  return [
    storage.join(directory, n)
    for n in names
    if n in present and storage.isfile(storage.join(directory, n))
  ]


def _named(path: str, parse: Callable, config: Any) -> ModelConfig:
  """parse(config), any failure a ConfigError naming the file."""
  try:
    return parse(config)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise ConfigError(
      f"{path} is not a valid CWM config ({type(e).__name__}: {e}); restore the file"
    ) from None


def open_source(directory: str, step: int | None = None) -> Source:
  """Opens and validates a checkpoint of any supported format (reads no tensor data)."""
  fmt = detect_format(directory)
  if fmt == "hf":
    path = storage.join(directory, "config.json")
    config = hf.read_json(path, "checkpoint config")
    cfg = _named(path, hf.config_from_hf, config)
    store = hf.SafetensorsReader(directory)
    declared = config.get("dtype") or config.get("torch_dtype")
    dtypes = _check_external(directory, HF, store, cfg, DTYPES.get(declared))
    ids = {k: config[k] for k in hf.TOKEN_ID_KEYS if config.get(k) is not None}
    return Source(
      fmt, cfg, _external_reader(HF, store, cfg), dtypes, ids, _files(directory, hf.TOKENIZER_FILES)
    )
  if fmt == "meta":
    path = storage.join(directory, "params.json")
    cfg = _named(path, meta.config_from_meta, hf.read_json(path, "checkpoint config"))
    store = meta.DcpReader(directory)
    dtypes = _check_external(directory, META, store, cfg, None)
    return Source(
      fmt,
      cfg,
      _external_reader(META, store, cfg),
      dtypes,
      {},
      _files(directory, ("tokenizer.model",)),
    )
  reader = _orbax_io.OrbaxReader(directory, step)
  cfg, want = reader.cfg, expected_shapes(reader.cfg)
  missing, extra = sorted(set(want) - set(reader.paths())), sorted(set(reader.paths()) - set(want))
  if missing or extra:
    raise ConvertError(
      f"{directory} step {reader.step}: params missing {missing[:5]}, "
      f"unexpected {extra[:5]} for its model config"
    )
  stored = reader.dtype(next(iter(want)))
  for path, shape in want.items():
    if reader.shape(path) != shape or reader.dtype(path) != stored or stored not in DTYPES.values():
      raise ConvertError(
        f"{directory} step {reader.step}: params/{'/'.join(path)} is "
        f"{reader.shape(path)} {reader.dtype(path)}; its config implies "
        f"{shape}, in the checkpoint's one dtype ({stored}), float32 or bfloat16"
      )
  tok = storage.join(reader.root, "tokenizer")
  run_config = reader.meta.get("config") if isinstance(reader.meta.get("config"), dict) else {}
  return Source(
    fmt,
    cfg,
    reader.read,
    {p: reader.dtype(p) for p in want},
    dict(run_config.get("token_ids") or {}),
    _files(tok, storage.listdir(tok)),
    reader.step,
    run_config,
  )


def _out_dtype(src: Source, dtype: str | None) -> np.dtype:
  if dtype is not None:
    if dtype not in DTYPES:
      raise ConvertError(f"--dtype {dtype!r} must be one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  found = sorted({d.name for d in src.dtypes.values()})
  if len(found) != 1 or found[0] not in DTYPES:
    raise ConvertError(f"source tensors are {found}; pass --dtype float32 or --dtype bfloat16")
  return DTYPES[found[0]]


class _Counter:
  """Counts the tensors and bytes written."""

  def __init__(self):
    self.tensors, self.bytes = 0, 0

  def __call__(self, x: np.ndarray) -> np.ndarray:
    self.tensors += 1
    self.bytes += x.nbytes
    return x


def _write_orbax(src: Source, out: str, dtype: np.dtype, step: int, count: _Counter) -> None:
  cfg = src.cfg
  params: dict = {}
  for path, shape in expected_shapes(cfg).items():

    def fetch(i, path=path):
      return count(src.read(path, i).astype(dtype, copy=False))

    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _orbax_io.LazyArray(shape, dtype, fetch, stacked=path[0] == "layers")
  _orbax_io.save_streaming(
    out, cfg, params, step, {"converted_from": src.fmt, "token_ids": token_ids(src)}
  )
  if src.tokenizer_files:
    _copy(src.tokenizer_files, storage.join(out, "tokenizer"))


def _external_specs(entries, src: Source, dtype: np.dtype, count: _Counter):
  """(specs, fetch) for writing `src` under `entries`' names, one layer at a time."""
  cfg, where = src.cfg, locate(entries, src.cfg)
  specs = [(name, e.shape(cfg), dtype) for name, (e, _) in where.items()]

  def fetch(name: str) -> np.ndarray:
    e, layer = where[name]
    return count(e.to_theirs(src.read(e.ours, layer).astype(dtype, copy=False), cfg))

  return specs, fetch


def _copy(files: list[str], directory: str) -> None:
  """Copies `files` (local or URLs) into `directory` under their own names."""
  storage.makedirs(directory)
  for path in files:
    storage.copy_file(path, storage.join(directory, storage.basename(path)))


def token_ids(src: Source) -> dict[str, Any]:
  """bos/eos/pad ids for an exported config: the source's own, else those of the
  tokenizer that goes with the model (a rank file shipped with it; for an orbax run,
  its `data.tokenizer` or the project's BPE); only ids inside the vocabulary."""
  ids = dict(src.token_ids)
  if not ids:
    tok = _model_tokenizer(src)
    if tok is not None:
      ids = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": list(tok.stop_ids),
        "pad_token_id": tok.special_id("<|pad|>"),
      }
  return hf.fitting_token_ids(ids, src.cfg.vocab_size)


def _model_tokenizer(src: Source) -> Tokenizer | None:
  ranks = [p for p in src.tokenizer_files if p.endswith((".model", ".tiktoken"))]
  try:
    if ranks:
      return Tokenizer.from_rank_file(storage.local_copy(ranks[0]))
    if src.fmt == "orbax":
      path = (src.run_config.get("data") or {}).get("tokenizer") or ""
      return Tokenizer.from_rank_file(storage.local_copy(path)) if path else Tokenizer.default()
  except (ConfigError, FileNotFoundError):
    return None  # no usable tokenizer: the ids are left out
  return None


def _write_hf(src, out, dtype, count, max_shard_bytes):
  specs, fetch = _external_specs(HF, src, dtype, count)
  hf.write_safetensors(out, specs, fetch, max_shard_bytes)
  _copy(src.tokenizer_files, out)
  ids = token_ids(src)
  hf_tokenizer.write(
    out,
    _fitting_tokenizer(src),
    ids,
    src.cfg.max_seq_len,
    frozenset(storage.basename(p) for p in src.tokenizer_files),
  )
  storage.write_json(
    storage.join(out, "config.json"), hf.config_to_hf(src.cfg, dtype=dtype.name, **ids), indent=2
  )


def _fitting_tokenizer(src: Source) -> Tokenizer | None:
  """The model's tokenizer (`_model_tokenizer`) when all its ids are inside the model's
  vocabulary, else None (e.g. a synthetic-vocabulary model: no tokenizer is exported)."""
  tok = _model_tokenizer(src)
  return tok if tok is not None and tok.vocab_size <= src.cfg.vocab_size else None


def _write_meta(src, out, dtype, count):
  specs, fetch = _external_specs(META, src, dtype, count)
  meta.write_dcp(out, specs, fetch)
  _copy([p for p in src.tokenizer_files if p.endswith("tokenizer.model")], out)
  storage.write_json(storage.join(out, "params.json"), meta.config_to_meta(src.cfg), indent=2)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


def sweep_partials(dst: str) -> list[str]:
  """Removes `.DST.partial-PID` staging directories of conversions to the local `dst` whose
  process is gone (killed before it could clean up); returns the removed paths."""
  if storage.is_url(dst):
    return []  # a URL's staging folder is a local temporary one, removed by its process
  parent, prefix = os.path.dirname(dst), f".{os.path.basename(dst)}.partial-"
  removed = []
  for name in os.listdir(parent):
    pid = name[len(prefix) :]
    if (
      name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
    ):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      removed.append(os.path.join(parent, name))
  return removed


def marker(to: str, step: int = 0) -> str:
  """The file (relative to the destination) whose presence makes a `to` checkpoint
  readable: `detect_format` needs config.json (HF) or params.json (Meta), orbax readers
  a step's commit file. Published last, so an interrupted upload is never read."""
  if to == "hf":
    return "config.json"
  if to == "meta":
    return "params.json"
  return f"{step}/{manager.COMMIT_FILE}"


def _check_empty(dst: str) -> None:
  if storage.isfile(dst) or storage.listdir(dst):
    raise ConvertError(
      f"destination {dst!r} exists and is not empty; choose a new directory (or delete that one)"
    )


@contextlib.contextmanager
def staging(dst: str, marker_file: str):
  """A local folder that becomes `dst` only if the block succeeds.

  Locally it sits beside `dst` (`.DST.partial-PID`, swept once its process is gone) and
  is renamed onto it; for a URL it is uploaded file by file, `marker_file` last
  (`storage.publish_dir`).
  """
  dst = storage.absolute(dst)
  _check_empty(dst)
  if storage.is_url(dst):
    with storage.publish_dir(dst, marker=marker_file) as tmp:
      yield tmp
    return
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  sweep_partials(dst)
  tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.replace(tmp, dst)


def _inside(path: str, root: str) -> bool:
  """`path` is `root` or below it (both absolute, or URLs)."""
  sep = "/" if storage.is_url(root) else os.sep
  return path.rstrip(sep) == root.rstrip(sep) or path.startswith(root.rstrip(sep) + sep)


def convert(
  src_dir: str,
  dst_dir: str,
  to: str,
  *,
  dtype: str | None = None,
  step: int | None = None,
  max_shard_bytes: int = 5 * 10**9,
) -> dict[str, Any]:
  """Converts `src_dir` (format detected) to format `to` in `dst_dir`; returns a summary.

  Args:
    dtype: 'float32' or 'bfloat16' for every output tensor (default: the source's).
    step: orbax step to read (default latest) or, converting to orbax, to write
      (default: the source's step, else 0).
    max_shard_bytes: upper bound on one safetensors file (one larger tensor gets its own).
  """
  if to not in FORMATS:
    raise ConvertError(f"--to {to!r} must be one of {FORMATS}")
  src_abs, dst_abs = storage.absolute(src_dir), storage.absolute(dst_dir)
  if _inside(dst_abs, src_abs):
    raise ConvertError(f"destination {dst_dir!r} must be outside the source {src_dir!r}")
  start = time.perf_counter()
  src = open_source(src_dir, step if detect_format(src_dir) == "orbax" else None)
  out_dtype, count = _out_dtype(src, dtype), _Counter()
  out_step = step if step is not None else (src.step or 0)
  with staging(dst_dir, marker(to, out_step)) as tmp:
    if to == "orbax":
      _write_orbax(src, tmp, out_dtype, out_step, count)
    elif to == "hf":
      _write_hf(src, tmp, out_dtype, count, max_shard_bytes)
    else:
      _write_meta(src, tmp, out_dtype, count)
  seconds = time.perf_counter() - start
  return {
    "from": src.fmt,
    "to": to,
    "dst": dst_abs,
    "dtype": out_dtype.name,
    "tensors": count.tensors,
    "bytes": count.bytes,
    "seconds": round(seconds, 3),
    "gb_per_s": round(count.bytes / 1e9 / max(seconds, 1e-9), 3),
    **({"step": out_step} if to == "orbax" else {}),
  }
