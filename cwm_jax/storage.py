"""One path layer: local paths and object-store URLs (`gs://`, `s3://`) behave the same.

Every file the system reads or writes goes through these functions (etils.epath
underneath, the API orbax already uses), so a workdir may be a local folder or a
bucket. A URL is never made absolute, globbed, created or opened with the local
file APIs.

Object stores differ from a disk in three ways that matter here, and the helpers
hide them:
- no rename: a directory that must appear whole (a corpus build, a conversion) is
  staged in a local temporary folder and uploaded file by file, its commit marker
  last (`publish_dir`); readers trust only a directory whose marker exists;
- no append: writers that grow a file (metrics) rewrite the whole object
  (`write_bytes`), which a store replaces atomically;
- readers that need a local file (the ArrayRecord C++ reader) read a cached copy
  (`local_copy`), keyed by the object's generation and bounded in size.

Emulator contract: with `STORAGE_EMULATOR_HOST=http://HOST:PORT` set, every gs://
access of every library here (gcsfs, tensorstore, Google's clients) goes to that
emulator; `configure_environment` derives what each library reads from that one
variable. Without it, real GCS with Application Default Credentials.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from etils import epath

from cwm_jax.base import ConfigError

_SCHEMES = ("gs://", "s3://")

# Other processes (every host of a job) and tensorstore (orbax's array writer) change
# the store behind fsspec's back, so a cached directory listing would hide committed
# checkpoints: list afresh every time.
for _protocol in ("gs", "s3"):
  fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
# gcsfs and fsspec log at INFO for every object they open, burying the progress lines.
for _name in ("gcsfs", "fsspec"):
  logging.getLogger(_name).setLevel(logging.WARNING)


def configure_environment(env: os._Environ | dict = os.environ) -> None:
  """Points tensorstore and gcsfs at `STORAGE_EMULATOR_HOST` when it is set.

  Runs at package import (before gcsfs or tensorstore read their settings); a
  variable the user set explicitly is left alone.
  """
  host = env.get("STORAGE_EMULATOR_HOST", "")
  if not host:
    return
  if "://" not in host:
    host = "http://" + host
    env["STORAGE_EMULATOR_HOST"] = host
  env.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
  # gcsfs's hierarchical-namespace probe asks a control-plane API that emulators do not
  # serve; it would fail (and warn) on every bucket access.
  env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  # An emulator takes any token; without one tensorstore searches for credentials and
  # logs an error on every open.
  env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def is_url(path: Any) -> bool:
  """True for an object-store URL (`gs://...`, `s3://...`)."""
  return str(path).startswith(_SCHEMES)


def _epath(path):
  return epath.Path(str(path))


def join(base: Any, *parts: str) -> str:
  """`base/part/...`: posix joins for URLs, the OS's for local paths."""
  base = str(base)
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def absolute(path: Any) -> str:
  """A local path made absolute; a URL as it is."""
  path = str(path)
  return path if is_url(path) else os.path.abspath(path)


def dirname(path: Any) -> str:
  path = str(path).rstrip("/")
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def basename(path: Any) -> str:
  return posixpath.basename(str(path).rstrip("/"))


def exists(path: Any) -> bool:
  return os.path.exists(path) if not is_url(path) else _epath(path).exists()


def isdir(path: Any) -> bool:
  return os.path.isdir(path) if not is_url(path) else _epath(path).is_dir()


def isfile(path: Any) -> bool:
  return os.path.isfile(path) if not is_url(path) else _epath(path).is_file()


def listdir(path: Any) -> list[str]:
  """Names directly under `path`, sorted; [] when it does not exist."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  p = _epath(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def makedirs(path: Any) -> None:
  """Creates `path` and its parents (on an object store, a no-op: prefixes need no
  directory objects)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern (`*`, `?`, `[...]`), local or URL."""
  if not is_url(pattern):
    return sorted(glob_lib.glob(pattern))
  scheme, rest = pattern.split("://", 1)
  bucket, _, key = rest.partition("/")
  root = f"{scheme}://{bucket}"
  return sorted(str(p) for p in _epath(root).glob(key)) if key else [root]


def check_writable(path: Any) -> None:
  """A URL workdir this process can write to, or a ConfigError naming the fix (a missing
  bucket otherwise reads as an empty folder and fails only at the first save)."""
  if not is_url(path):
    return
  probe = join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
  try:
    write_bytes(probe, b"")
    remove(probe)
  except Exception as e:  # pylint: disable=broad-except  (any client error: no bucket, no rights)
    first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise ConfigError(
      f"cannot write to {path} ({type(e).__name__}: {first[:300]}); check that "
      "the bucket exists and that this machine's credentials may write to it "
      "(or, for tests, that STORAGE_EMULATOR_HOST names a running emulator)"
    ) from None


def read_bytes(path: Any) -> bytes:
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  return _epath(path).read_bytes()


def read_text(path: Any) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: Any) -> Any:
  return json.loads(read_bytes(path))


def write_bytes(path: Any, data: bytes) -> None:
  """Writes the whole file at once: a reader sees the old content or the new, never a
  part (a local temporary file renamed over it; one object upload on a store)."""
  path = str(path)
  if is_url(path):
    _epath(path).write_bytes(data)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_text(path: Any, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: Any, obj: Any, **kw) -> None:
  write_text(path, json.dumps(obj, **kw))


@contextlib.contextmanager
def open_file(path: Any, mode: str = "r", **kw) -> Iterator[Any]:
  """A file object for reading or writing `path` (a URL's writes land at close)."""
  if not is_url(path):
    with open(path, mode, **kw) as f:  # pylint: disable=unspecified-encoding
      yield f
  else:
    with _epath(path).open(mode, **kw) as f:
      yield f


def remove(path: Any) -> None:
  """Deletes a file or a whole directory tree; nothing if it does not exist."""
  if not is_url(path):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.unlink(path)
    return
  p = _epath(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def move_aside(path: Any, new_path: Any) -> None:
  """Renames a directory (atomic locally; copy then delete on an object store, whose
  readers never trust a directory without its commit marker)."""
  if not is_url(path):
    os.replace(path, new_path)
    return
  upload_tree(path, new_path)
  remove(path)


def upload_tree(src: Any, dst: Any, *, last: tuple[str, ...] = ()) -> None:
  """Copies every file under `src` to `dst` (local or URL, either side); the files
  named in `last` (relative paths, e.g. a commit marker) are copied after the rest."""
  src, dst = str(src), str(dst)
  rels = [r for r in _walk(src) if r not in last] + [r for r in last if exists(join(src, r))]
  for rel in rels:
    copy_file(join(src, rel), join(dst, *rel.split("/")))


def _walk(root: str) -> list[str]:
  """Relative '/'-joined paths of the files under `root`, sorted."""
  if not is_url(root):
    out = []
    for d, _, files in os.walk(root):
      rel = os.path.relpath(d, root)
      out += [f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in files]
    return sorted(out)
  fs, key = fsspec.core.url_to_fs(root)
  key = key.rstrip("/")
  return sorted(name[len(key) + 1 :] for name in fs.find(key))


def copy_file(src: Any, dst: Any) -> None:
  """Copies one file, streaming (local or URL on either side)."""
  src, dst = str(src), str(dst)
  if not is_url(src) and not is_url(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.copyfile(src, dst)
    return
  makedirs(dirname(dst))
  with open_file(src, "rb") as fi, open_file(dst, "wb") as fo:
    shutil.copyfileobj(fi, fo, 16 << 20)


@contextlib.contextmanager
def publish_dir(dst: Any, *, marker: str) -> Iterator[str]:
  """A local staging folder that becomes `dst` when the block succeeds.

  Locally the staging folder sits beside `dst` and is renamed onto it (atomic); on an
  object store it is a temporary folder uploaded file by file with `marker` (the
  file readers check for completeness, e.g. 'manifest.json') uploaded last. On an
  error nothing complete-looking is left at `dst`.
  """
  dst = absolute(dst)
  if is_url(dst):
    tmp = tempfile.mkdtemp(prefix="cwm-stage-")
    try:
      yield tmp
      upload_tree(tmp, dst, last=(marker,))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dst)}.tmp-")
  try:
    yield tmp
    if os.path.isdir(dst) and not os.listdir(dst):
      os.rmdir(dst)
    os.replace(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def cache_dir() -> str:
  """Where `local_copy` keeps objects: $CWM_CACHE_DIR, else ~/.cache/cwm_jax/objects."""
  return os.environ.get("CWM_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "cwm_jax", "objects"
  )


def cache_limit_bytes() -> int:
  """The cache's size bound: $CWM_CACHE_GB (default 50) gigabytes."""
  return int(float(os.environ.get("CWM_CACHE_GB", "50")) * (1 << 30))


def _version(url: str) -> str:
  """The object's generation (GCS) or ETag (S3), so a rewritten object is fetched anew."""
  fs, key = fsspec.core.url_to_fs(url)
  meta = fs.info(key)
  return str(
    meta.get("generation")
    or meta.get("ETag")
    or meta.get("etag")
    or f"{meta.get('size')}-{meta.get('updated') or meta.get('LastModified')}"
  )


def local_copy(path: Any) -> str:
  """A local file with `path`'s content: `path` itself when local; for a URL a copy in
  the cache (`cache_dir()`), keyed by URL and object generation, fetched once per
  machine, least recently used copies evicted past `cache_limit_bytes()`."""
  path = str(path)
  if not is_url(path):
    return path
  key = hashlib.sha256(f"{path}@{_version(path)}".encode()).hexdigest()[:32]
  root = cache_dir()
  os.makedirs(root, exist_ok=True)
  local = os.path.join(root, f"{key}-{basename(path)}")
  if os.path.isfile(local):
    os.utime(local)  # recently used
    return local
  fd, tmp = tempfile.mkstemp(dir=root, prefix=".fetch-")
  try:
    with os.fdopen(fd, "wb") as fo, open_file(path, "rb") as fi:
      shutil.copyfileobj(fi, fo, 16 << 20)
    os.replace(tmp, local)  # concurrent fetches of one object on a host: last one wins
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _evict(root, keep=local)
  return local


def _evict(root: str, keep: str) -> None:
  entries = []
  for name in os.listdir(root):
    p = os.path.join(root, name)
    if name.startswith(".") or p == keep:
      continue
    with contextlib.suppress(OSError):
      st = os.stat(p)
      entries.append((st.st_mtime, st.st_size, p))
  total = sum(e[1] for e in entries) + os.path.getsize(keep)
  for _, size, p in sorted(entries):
    if total <= cache_limit_bytes():
      break
    with contextlib.suppress(OSError):
      os.unlink(p)
      total -= size
