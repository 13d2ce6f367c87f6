"""One cgroup per sandboxed run: the kernel's bound on the run's total memory and process count.

Caller side, stdlib only. setrlimit bounds each process of a run, not the run: its children,
memfds, pages of its scratch tmpfs and kernel buffers add up past `Limits.memory_mb`. A cgroup
per run counts all of them together; an allocation past the limit makes the kernel's OOM
killer end processes of that run only, and the sandbox reports status 'memory'.

`Limits.cgroup` picks the hierarchy: 'auto' (v2 where it works, else v1, else none), 'v2',
'v1' (CgroupUnavailable where the host does not offer it) or 'off' (per-process limits only).

v2: where this process's own cgroup (`0::PATH` in /proc/self/cgroup, under the cgroup2 mount)
  is writable and lists `memory` and `pids` in `cgroup.controllers`. A cgroup with processes
  cannot enable controllers for its children ("no internal processes"): unless they already
  are enabled, this process moves itself into a leaf `cwm-sandbox-<id>-caller` and enables
  memory and pids in its cgroup's `cgroup.subtree_control` (refused while other processes
  share that cgroup: run the caller in a cgroup of its own, e.g. a delegated systemd scope).
  Each run gets a sibling leaf with `memory.max` = memory_mb, `memory.swap.max` = 0,
  `memory.oom.group` = 1 (an OOM kill ends the whole run) and `pids.max` (see below); it is
  emptied with `cgroup.kill`; OOM kills are read from `memory.events`.
v1: where the memory and pids hierarchies are writable: a cgroup per run in each, under this
  process's own cgroups there, with `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`
  where swap is accounted, so that swap does not extend it) and `pids.max`; emptied by killing
  every pid in `cgroup.procs` until none is left; OOM kills are read from `memory.oom_control`.

How a run enters its cgroup: the caller makes it, starts the supervisor and writes the
supervisor's pid into `cgroup.procs` before it sends the request (the supervisor does nothing
until it has one), so the worker it forks and every process of the program are born inside.
The supervisor is moved rather than the worker: a move waits for an RCU grace period, which
then passes while the supervisor's interpreter starts instead of delaying the worker. It
counts as one of the run's processes (pids.max = max_processes + 1) and its allocations
after the move as the run's memory; an OOM kill that picks it ends the run all the same.

Names are `cwm-sandbox-<caller pid>-<caller start time>-<n>`. A run's cgroup is removed when
the run ends (its processes killed first); one still busy is retried by later runs and at
exit. A caller killed mid-run leaves empty cgroups behind (its supervisors kill their workers
when its socket closes): the first run of the next caller process removes those of callers
that are gone (`sweep`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import os
import re
import signal
import threading
import time

from cwm_jax.base import ConfigError

MODES = ("auto", "v2", "v1", "off")
PREFIX = "cwm-sandbox-"
_NAME = re.compile(r"cwm-sandbox-(\d+)-(\d+)-(?:\d+|caller)\Z")
_NEEDED = ("memory", "pids")
# How long `settle` (and the exit of this process) waits for killed processes to leave: one
# stuck in the kernel (e.g. on a hung filesystem) must not hold the caller forever; what is
# left then is removed by the next caller process (`sweep`).
_SETTLE_S = 5.0
_LOCK = threading.RLock()
_COUNTER = itertools.count()
_PENDING: list[tuple[str, ...]] = []  # cgroups of ended runs that were still busy


def _new_lock() -> None:
  global _LOCK
  _LOCK = threading.RLock()  # a lock held by another thread at fork stays held in the child


os.register_at_fork(after_in_child=_new_lock)


class CgroupUnavailable(ConfigError):
  """Limits.cgroup asks for a hierarchy this host does not offer to this process."""


@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """Where this process makes its runs' cgroups."""

  version: int  # 2 or 1
  parents: tuple[str, ...]  # v2: (the cgroup runs are made in,); v1: memory's, then pids'
  # (one folder where both controllers share a mount)


def detect() -> dict:
  """What each mode gives here: {'auto': 'v2'|'v1'|'none', 'v2': folder or why not, 'v1': ...}."""
  out = {}
  for version, find in ((2, _v2), (1, _v1)):
    with _LOCK:
      found = find()
    out[f"v{version}"] = list(found.parents) if isinstance(found, Hierarchy) else found
  auto = resolve("auto")
  out["auto"] = f"v{auto.version}" if auto else "none"
  return out


def resolve(mode: str) -> Hierarchy | None:
  """The hierarchy of `mode` (see MODES), None for 'off' or 'auto' without one; raises
  CgroupUnavailable when 'v2' or 'v1' is asked for and not offered."""
  if mode not in MODES:
    raise ValueError(f"Limits.cgroup must be one of {MODES}, got {mode!r}")
  if mode == "off":
    return None
  for version, find in ((2, _v2), (1, _v1)):
    if mode in ("auto", f"v{version}"):
      with _LOCK:  # detected once, also when runs start from several threads
        found = find()
      if isinstance(found, Hierarchy):
        return found
      if mode != "auto":
        raise CgroupUnavailable(
          f"Limits.cgroup={mode!r}, but this host does not offer it to this process: {found}. "
          "Use cgroup='auto' (the best there is, possibly none) or 'off'."
        )
  return None


class RunCgroup:
  """The cgroup(s) of one run: made at construction, ended by `finish()`."""

  def __init__(self, hierarchy: Hierarchy, memory_bytes: int, processes: int):
    with _LOCK:
      _retry_pending()
    self.version = hierarchy.version
    name = f"{PREFIX}{_identity()}-{next(_COUNTER)}"
    self.dirs = tuple(os.path.join(parent, name) for parent in hierarchy.parents)
    try:
      for folder in self.dirs:
        _mkdir(folder)
        _limit(folder, self.version, memory_bytes, processes)
    except OSError as e:
      _remove(self.dirs)
      raise CgroupUnavailable(f"cannot make the run's cgroup {self.dirs}: {e}") from e

  def add(self, pid: int) -> bool:
    """Moves process `pid` (all its threads) into the run's cgroup(s); False if it is gone.
    Raises CgroupUnavailable if the kernel refuses."""
    for folder in self.dirs:
      try:
        _write(os.path.join(folder, "cgroup.procs"), str(pid))
      except ProcessLookupError:
        return False
      except OSError as e:
        raise CgroupUnavailable(f"cannot move process {pid} into {folder}: {e}") from e
    return True

  def finish(self) -> bool:
    """Kills what is left of the run and removes its cgroup(s); returns whether the kernel's
    OOM killer ended any of its processes. Not waited for: the supervisor leaves the cgroup
    only once the kernel has torn its namespaces down, so a cgroup still busy is killed and
    removed again by the next run's start (or `settle`, or at exit)."""
    _kill_all(self.dirs)
    oom = _oom_kills(self.dirs[0], self.version) > 0
    if not _remove(self.dirs):
      with _LOCK:
        _PENDING.append(self.dirs)
    return oom


def create(mode: str, memory_bytes: int, processes: int) -> RunCgroup | None:
  """A fresh cgroup for one run under `mode`'s hierarchy, or None (off, or auto without one)."""
  found = resolve(mode)
  return None if found is None else RunCgroup(found, memory_bytes, processes)


def existing(pid: int | None = None) -> list[str]:
  """The run cgroups (not a v2 caller's leaf) of process `pid` (default: this one) that exist
  now, in every hierarchy this process uses."""
  prefix = PREFIX + (_identity() + "-" if pid is None else f"{pid}-")
  found = []
  for find in (_v2, _v1):
    with _LOCK:
      hierarchy = find()
    for parent in hierarchy.parents if isinstance(hierarchy, Hierarchy) else ():
      try:
        names = os.listdir(parent)
      except OSError:
        continue
      found += [
        os.path.join(parent, n) for n in names if n.startswith(prefix) and not n.endswith("-caller")
      ]
  return sorted(found)


def sweep(parents: tuple[str, ...]) -> int:
  """Removes the sandbox's cgroups in `parents` whose caller process is gone; returns how
  many. Busy ones (still holding processes) stay."""
  removed = 0
  for parent in parents:
    try:
      names = os.listdir(parent)
    except OSError:
      continue
    for name in names:
      match = _NAME.match(name)
      if match and not _alive(int(match[1]), int(match[2])):
        removed += _remove((os.path.join(parent, name),))
  return removed


def _mkdir(folder: str) -> None:
  os.mkdir(folder, 0o755)  # the kernel fills a cgroup's folder with its interface files


def _limit(folder: str, version: int, memory_bytes: int, processes: int) -> None:
  files = set(os.listdir(folder))
  if version == 2:
    values = [("memory.max", memory_bytes), ("memory.swap.max", 0), ("memory.oom.group", 1)]
    values.append(("pids.max", processes))
  else:  # the memory limit before memsw, which may not be below it
    values = [
      ("memory.limit_in_bytes", memory_bytes),
      ("memory.memsw.limit_in_bytes", memory_bytes),
    ]
    values.append(("pids.max", processes))
  required = {"memory.max", "memory.limit_in_bytes", "pids.max"}
  wrote = False
  for name, value in values:
    if name in files:
      _write(os.path.join(folder, name), str(value))
      wrote = wrote or name in required
    elif name in required and version == 2:
      raise OSError(f"{folder} has no {name}")
  if not wrote:
    raise OSError(f"{folder} has no limit files")


def _kill_all(dirs: tuple[str, ...]) -> None:
  """SIGKILL to every process in the cgroups (v2: `cgroup.kill`, which also reaches processes
  forked meanwhile; v1: each listed pid, repeated by every retry until none is left)."""
  kill = os.path.join(dirs[0], "cgroup.kill")
  if os.path.exists(kill):
    _write(kill, "1", missing_ok=True)
    return
  for pid in {pid for folder in dirs for pid in _procs(folder)}:
    _kill(pid, dirs)


def settle(timeout_s: float = _SETTLE_S) -> list[str]:
  """Kills and removes the cgroups of this process's ended runs that were still busy, waiting
  until they are gone or `timeout_s` has passed; returns those left."""
  deadline = time.monotonic() + timeout_s
  while True:
    with _LOCK:
      _retry_pending()
      left = [folder for dirs in _PENDING for folder in dirs]
    if not left or time.monotonic() > deadline:
      return left
    time.sleep(0.001)


def _kill(pid: int, dirs: tuple[str, ...]) -> None:
  """SIGKILL to `pid` if it is still in the run's cgroups: checked through a pidfd, so that a
  pid reused by another process after it was listed is never signalled."""
  try:
    pidfd = os.pidfd_open(pid)
  except OSError:
    return  # gone
  try:
    if any(pid in _procs(folder) for folder in dirs):
      signal.pidfd_send_signal(pidfd, signal.SIGKILL)
  except OSError:
    pass
  finally:
    os.close(pidfd)


def _procs(folder: str) -> list[int]:
  try:
    with open(os.path.join(folder, "cgroup.procs")) as f:
      return [int(line) for line in f.read().split()]
  except OSError:
    return []


def _oom_kills(folder: str, version: int) -> int:
  name = "memory.events" if version == 2 else "memory.oom_control"
  try:
    with open(os.path.join(folder, name)) as f:
      for line in f:
        key, _, value = line.partition(" ")
        if key == "oom_kill":
          return int(value)
  except (OSError, ValueError):
    pass
  return 0


def _remove(dirs) -> bool:
  """rmdir of each folder; whether all are gone (also those that were already)."""
  gone = 0
  for folder in dirs:
    try:
      os.rmdir(folder)
    except FileNotFoundError:
      pass
    except OSError:
      continue
    gone += 1
  return gone == len(dirs)


def _retry_pending() -> None:
  for dirs in _PENDING:
    _kill_all(dirs)
  _PENDING[:] = [dirs for dirs in _PENDING if not _remove(dirs)]


atexit.register(settle)


def _write(path: str, text: str, missing_ok: bool = False) -> None:
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
  except FileNotFoundError:
    if missing_ok:
      return
    raise
  try:
    os.write(fd, text.encode())
  finally:
    os.close(fd)


def _start_time(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return int(f.read().rsplit(b")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _alive(pid: int, start: int) -> bool:
  return _start_time(pid) == start


def _identity() -> str:
  """'<pid>-<start time>' of this process (a pid alone may be reused once it is gone)."""
  return _identity_of(os.getpid())


@functools.cache
def _identity_of(pid: int) -> str:
  return f"{pid}-{_start_time(pid)}"


def own_cgroups(text: str) -> dict[str, str]:
  """{controller: path} from /proc/self/cgroup's text; the v2 path under ''."""
  out = {}
  for line in text.splitlines():
    parts = line.split(":", 2)
    if len(parts) == 3:
      for controller in parts[1].split(",") if parts[1] else [""]:
        out[controller] = parts[2]
  return out


def cgroup_mounts(text: str) -> list[tuple[str, str, str, set[str]]]:
  """(mount point, root within the hierarchy, fstype, super options) of each cgroup mount in
  /proc/self/mountinfo's text."""
  out = []
  for line in text.splitlines():
    left, sep, right = line.partition(" - ")
    fields, tail = left.split(), right.split()
    if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
      continue
    out.append((_unescape(fields[4]), _unescape(fields[3]), tail[0], set(tail[2].split(","))))
  return out


def _unescape(text: str) -> str:
  """mountinfo's octal escapes (space, tab, newline, backslash) undone."""
  return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def folder_of(path: str, mounts, fstype: str, controller: str = "") -> str | None:
  """The folder of the cgroup `path` (as /proc/self/cgroup names it) in a mount of `fstype`
  (holding `controller` for v1) whose root contains it; None if none is visible."""
  for point, root, kind, options in mounts:
    if kind != fstype or (controller and controller not in options):
      continue
    root = root.rstrip("/")
    if path == root or path.startswith(root + "/") or not root:
      return os.path.normpath(point + "/" + path[len(root) :])
  return None


def _host():
  with open("/proc/self/cgroup") as f:
    own = own_cgroups(f.read())
  with open("/proc/self/mountinfo") as f:
    mounts = cgroup_mounts(f.read())
  return own, mounts


def _read_words(path: str) -> set[str]:
  try:
    with open(path) as f:
      return set(f.read().split())
  except OSError:
    return set()


@functools.cache
def _v2() -> Hierarchy | str:
  """The v2 hierarchy (this process's cgroup, made able to hold runs), or why not."""
  with _LOCK:
    found = v2_parent(*_host())
    return _checked(found) if isinstance(found, Hierarchy) else found


def v2_parent(own: dict[str, str], mounts) -> Hierarchy | str:
  """The v2 cgroup runs are made in, given /proc/self/cgroup and the cgroup mounts (parsed),
  with memory and pids enabled for its children (this process moved into a leaf first if
  needed), or why there is none."""
  if "" not in own:
    return "this process has no cgroup v2 path (no unified hierarchy)"
  folder = folder_of(own[""], mounts, "cgroup2")
  if folder is None:
    return f"its cgroup v2 {own['']} is under no visible cgroup2 mount"
  if _NAME.match(os.path.basename(folder)):  # a caller's leaf: a process it started
    folder = os.path.dirname(folder)
  offered = _read_words(os.path.join(folder, "cgroup.controllers"))
  if not set(_NEEDED) <= offered:
    return f"{folder} offers the controllers {sorted(offered) or 'none'}, not memory and pids"
  if not os.access(folder, os.W_OK):
    return f"{folder} is not writable by this process (no delegation)"
  if not set(_NEEDED) <= _read_words(os.path.join(folder, "cgroup.subtree_control")):
    problem = _enable_v2(folder)
    if problem:
      return problem
  return Hierarchy(2, (folder,))


def _enable_v2(folder: str) -> str:
  """Moves this process into a leaf of `folder` and enables memory and pids for its children;
  '' or why not (then this process is back where it was)."""
  leaf = os.path.join(folder, f"{PREFIX}{_identity()}-caller")
  try:
    if not os.path.isdir(leaf):
      _mkdir(leaf)
    _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
  except OSError as e:
    _remove((leaf,))
    return f"cannot move this process into a leaf of {folder}: {e}"
  try:
    _write(os.path.join(folder, "cgroup.subtree_control"), " ".join("+" + c for c in _NEEDED))
  except OSError as e:
    try:
      _write(os.path.join(folder, "cgroup.procs"), str(os.getpid()))
    except OSError:
      pass
    _remove((leaf,))
    return (
      f"cannot enable memory and pids below {folder} ({e}): other processes share this "
      "process's cgroup; run the caller in a cgroup of its own (e.g. a delegated systemd scope)"
    )
  return ""


@functools.cache
def _v1() -> Hierarchy | str:
  """The v1 memory and pids folders of this process, or why not."""
  with _LOCK:
    own, mounts = _host()
    parents = []
    for controller in _NEEDED:
      if controller not in own:
        return f"this process is in no v1 {controller} hierarchy"
      folder = folder_of(own[controller], mounts, "cgroup", controller)
      if folder is None:
        return f"its v1 {controller} cgroup {own[controller]} is under no visible mount"
      if not os.access(folder, os.W_OK):
        return f"{folder} is not writable by this process"
      if folder not in parents:
        parents.append(folder)
    return _checked(Hierarchy(1, tuple(parents)))


def _checked(hierarchy: Hierarchy) -> Hierarchy | str:
  """`hierarchy` once a run's cgroup could be made and removed there (stale ones of gone
  callers are removed first), or why not."""
  sweep(hierarchy.parents)
  try:
    probe = RunCgroup(hierarchy, 1 << 30, 16)
  except CgroupUnavailable as e:
    return str(e)
  if not _remove(probe.dirs):
    return f"cannot remove the probe cgroup {probe.dirs}"
  return hierarchy
