"""Random-access record sources for the grain pipeline.

Kinds: `array_record` (files written by `cwm_jax.data.build`, a glob or a
folder), `tfds` (a prepared TFDS builder folder, e.g. `--writer tfds`, whose
examples carry a `record` feature) and `jsonl` (one JSON object per line).
Every source yields raw record bytes; decoding happens in the pipeline so bad
records are counted, not raised.

Paths may be local or object-store URLs (`gs://...`, see `cwm_jax.storage`).
The ArrayRecord and TFDS readers are C++ readers of local files and JSONL is
read at random offsets, so a URL's files are read from the local cache
(`storage.local_copy`: fetched once per machine and object generation); the
cache must hold every file a run reads at once (`CWM_CACHE_GB`).
"""

import hashlib
import json
import os
import shutil
import tempfile

import grain

from cwm_jax import storage
from cwm_jax.base import ConfigError, require_extra

KINDS = ("array_record", "tfds", "jsonl")


def _files(path: str, suffix: str) -> list[str]:
  """The files of a source path: a folder's `*SUFFIX` files, else the glob's matches."""
  try:
    pattern = storage.join(path, f"*{suffix}") if storage.isdir(path) else path
    files = storage.glob(pattern)
  except OSError as e:  # e.g. a bucket that does not exist
    raise ConfigError(
      f"cannot list {path!r} ({type(e).__name__}: {e}); give an existing "
      f"folder or glob of {suffix} files"
    ) from None
  if not files:
    raise ConfigError(
      f"no {suffix} files match {path!r}: build them with "
      "`python -m cwm_jax.data.build --corpus NAME --out DIR`"
    )
  return files


def _local_copies(files: list[str], path: str) -> list[str]:
  """Local files with the content of `files` (URLs fetched into the cache).

  The readers open their files lazily, so every copy must still be in the cache
  once all are fetched: a bound too small for the source is a config error, not
  a missing file later in training.
  """
  try:
    local = [storage.local_copy(f) for f in files]
  except OSError as e:
    raise ConfigError(
      f"cannot fetch the files of {path!r} ({type(e).__name__}: {e}); check "
      "the URL and its read permission"
    ) from None
  evicted = [f for f, l in zip(files, local) if not os.path.isfile(l)]
  if evicted:
    raise ConfigError(
      f"the files of {path!r} do not fit the local object cache "
      f"({storage.cache_limit_bytes() / 2**30:.1f} GiB at "
      f"{storage.cache_dir()}; {evicted[:3]} were evicted): raise CWM_CACHE_GB "
      "or point CWM_CACHE_DIR at a larger disk"
    )
  return local


class JsonlSource(grain.sources.RandomAccessDataSource):
  """Lines of JSONL files as bytes (line offsets indexed up front).

  A URL's lines are read from its local cached copy; a copy evicted since the
  index was built is fetched again when a reader opens it.
  """

  def __init__(self, paths: list[str]):
    self._paths = list(paths)
    self._local = _local_copies(self._paths, ", ".join(self._paths))
    self._index = []  # (file number, offset, length)
    for fi, local in enumerate(self._local):
      offset = 0
      with open(local, "rb") as f:  # a local file: the path itself or its cached copy
        for line in f:
          self._index.append((fi, offset, len(line)))
          offset += len(line)
    self._handles = None

  def __len__(self) -> int:
    return len(self._index)

  def _open(self) -> list:
    for i, (path, local) in enumerate(zip(self._paths, self._local)):
      if not os.path.isfile(local):
        self._local[i] = storage.local_copy(path)
    return [open(l, "rb") for l in self._local]  # pylint: disable=consider-using-with

  def __getitem__(self, i: int) -> bytes:
    if self._handles is None:  # opened lazily, once per worker process
      self._handles = self._open()
    fi, offset, length = self._index[i]
    f = self._handles[fi]
    f.seek(offset)
    return f.read(length).rstrip(b"\r\n")

  def __getstate__(self):
    return {**self.__dict__, "_handles": None}


def _tree(url: str, rel: str = "") -> list[str]:
  """'/'-joined paths of the files under folder `url`, sorted (a TFDS builder folder
  is a few files deep, so listing level by level costs a few requests)."""
  out = []
  for name in storage.listdir(storage.join(url, rel) if rel else url):
    child = f"{rel}/{name}" if rel else name
    if storage.isdir(storage.join(url, child)):
      out += _tree(url, child)
    else:
      out.append(child)
  return out


def local_folder(url: str) -> str:
  """A local folder with the files under folder `url`: links to their cached copies.

  For readers that open a whole folder of local files (a TFDS builder). The
  folder is keyed by the copies' names, which carry each object's generation, so
  a rewritten builder gets a new folder. It sits in the cache directory under a
  dot name, which the cache's eviction leaves alone (the links take no space).
  """
  if not storage.is_url(url):
    return url
  rels = _tree(url)
  if not rels:
    raise ConfigError(
      f"nothing under {url!r}: give a prepared TFDS builder folder (the path "
      "that `python -m cwm_jax.data.build --writer tfds` prints)"
    )
  copies = dict(zip(rels, _local_copies([storage.join(url, *r.split("/")) for r in rels], url)))
  key = hashlib.sha256(json.dumps(sorted(copies.items())).encode()).hexdigest()[:32]
  root = os.path.join(storage.cache_dir(), f".tree-{key}")
  if os.path.isdir(root):
    return root
  tmp = tempfile.mkdtemp(dir=storage.cache_dir(), prefix=".tree-tmp-")
  try:
    for rel, local in copies.items():
      link = os.path.join(tmp, *rel.split("/"))
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(local, link)
    os.replace(tmp, root)
  except OSError:
    if not os.path.isdir(root):  # else made meanwhile by another reader: use theirs
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


class TfdsRecords(grain.sources.RandomAccessDataSource):
  """The `record` feature of a TFDS array_record data source, as bytes."""

  def __init__(self, builder_dir: str, split: str):
    tfds = require_extra("tensorflow_datasets", "data", "a data source of kind tfds")
    local = local_folder(builder_dir)
    try:
      builder = tfds.builder_from_directory(local)
    except Exception as e:  # tfds raises several kinds for a bad folder
      raise ConfigError(
        f"{builder_dir!r} is not a prepared TFDS builder folder ({e}); build with --writer tfds"
      ) from e
    self._source = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    example = self._source[i]
    return example.get("record", example) if isinstance(example, dict) else example


def make_source(kind: str, path: str, split: str = "train"):
  """A grain random-access source of raw records (`path` local or a URL)."""
  if kind == "array_record":
    files = _files(path, ".array_record")
    local = _local_copies(files, path)
    try:
      return grain.sources.ArrayRecordDataSource(local)
    except Exception as e:  # array_record raises several kinds for a damaged file
      raise ConfigError(
        f"cannot open the array_record files {files[:3]} of {path!r} "
        f"({type(e).__name__}: {e}); rebuild them with "
        "`python -m cwm_jax.data.build`"
      ) from None
  if kind == "jsonl":
    files = _files(path, ".jsonl")
    try:
      return JsonlSource(files)
    except OSError as e:
      raise ConfigError(f"cannot read the jsonl files of {path!r}: {e}") from None
  if kind == "tfds":
    return TfdsRecords(path, split)
  raise ConfigError(f"source kind {kind!r}: choose one of {KINDS}")
