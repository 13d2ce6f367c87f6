"""Runs untrusted Python in an isolated child process with time, memory, output and disk limits.

Caller side. Each run starts `child.py` (the supervisor) in fresh PID, mount, network and
IPC namespaces where the kernel allows (isolation.py; otherwise the run is refused unless
`Limits.allow_no_isolation`): the program cannot see or signal the caller, every process it
starts dies with the run, its filesystem is a minimal read-only root (system directories and
the interpreter) plus a size-capped tmpfs scratch that vanishes with the namespace, a seccomp
filter denies new namespaces, mounts and memfd, and a root caller's program runs as a uid of
its own without capabilities (docs/security.md). Where the host offers cgroups (cgroups.py),
each run also gets its own, which bounds the memory and processes of the whole run; a run the
kernel's OOM killer ended has status 'memory'. The supervisor gets its request over a
private socket that is also its lifeline (the run ends when the caller dies) and reports the
program's wait status on it; records (traces, test verdicts) come over a pipe, tagged with a
per-run nonce (channel.py, channel_writer.py). Hitting a limit gives a status, never an exception in the caller.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import marshal
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from cwm_jax.data.traces import cgroups, channel, isolation
from cwm_jax.data.traces.cgroups import CgroupUnavailable
from cwm_jax.data.traces.isolation import CHILD, SandboxRefused

STATUSES = ("ok", "error", "timeout", "memory", "output_limit")
_GRACE_S = 2.0  # the supervisor ends the run at timeout_s; the caller's backstop waits longer
_UNREAPED: list = []  # killed `unshare` processes still exiting; polled (reaped) by later runs
_UNREAPED_LOCK = threading.Lock()

__all__ = [
  "CHILD",
  "CgroupUnavailable",
  "Limits",
  "STATUSES",
  "SandboxRefused",
  "SandboxResult",
  "run_child",
  "run_python",
]


_MAX_COUNT = 1 << 50  # bytes, inodes, processes, events, characters
_MAXIMA = {"timeout_s": 1e6, "cpu_s": 1e6, "memory_mb": 1 << 30}


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed run and of the trace it records."""

  timeout_s: float = 10.0  # wall clock
  cpu_s: float | None = None  # CPU time; None: timeout_s + 1
  memory_mb: int = 1024  # address space of each process (RLIMIT_AS); with a cgroup, also all
  # memory of the run together (its processes, scratch tmpfs, kernel buffers): cgroups.py
  output_bytes: int = 1_000_000  # stdout + stderr
  file_bytes: int = 64 << 20  # largest file the program may write
  disk_bytes: int = 128 << 20  # all files the program may write (the scratch tmpfs)
  disk_inodes: int = 4096  # files and directories in the scratch tmpfs
  max_processes: int = 256  # processes of the program's uid, which is the run's own; with a
  # cgroup, also every process and thread of the run (pids.max)
  max_events: int = 10_000  # traces with more line events are dropped ('too_long')
  max_trace_bytes: int = 1_000_000  # formatted trace text; larger ones are dropped
  max_value_chars: int = 1000  # longer value encodings are truncated
  namespaces: bool = True  # PID/mount/network namespaces where the kernel allows them
  allow_no_isolation: bool = False  # run even without them (the network is then only blocked
  # in-process, and a program with the caller's uid may signal it); otherwise SandboxRefused
  # Let the program import installed packages. Off by default: every start then runs `site`,
  # which reads the virtualenv's .pth files and imports what they name, for each run.
  site_packages: bool = False
  # The run's own cgroup: 'auto' (v2, else v1, else none), 'v2', 'v1' (CgroupUnavailable where
  # the host does not offer it), 'off' (per-process limits only). See cgroups.py.
  cgroup: str = "auto"

  def __post_init__(self):
    if self.cgroup not in cgroups.MODES:
      raise ValueError(f"Limits.cgroup must be one of {cgroups.MODES}, got {self.cgroup!r}")
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      # The kernel takes these as 64-bit counts (setrlimit, tmpfs size=, memory.max): an
      # infinite or astronomically large limit is a typo, never a request.
      top = _MAXIMA.get(field.name, _MAX_COUNT)
      if not (0 < value <= top):  # also false for NaN
        raise ValueError(f"Limits.{field.name} must be positive and at most {top}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  status: str  # one of STATUSES
  stdout: str
  stderr: str
  returncode: int | None


@dataclasses.dataclass(frozen=True)
class Records:
  """What the worker sent over the record channel, decoded strictly."""

  records: list[dict]
  error: str  # '' or what was wrong with the channel's bytes
  overflow: bool  # more than the allowed bytes arrived (the rest was dropped)


def run_python(source: str, *, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
  """Runs `source` as `__main__` in the sandbox, feeding it `stdin`."""
  result, _ = run_child({"mode": "run"}, source, stdin=stdin, limits=limits)
  return result


def run_child(
  request: dict, source: str, *, stdin: str = "", limits: Limits, record_bytes: int = 1 << 20
) -> tuple[SandboxResult, Records]:
  """Runs the worker on `request` ('mode': run/trace/test, ...) with `source` as program.py;
  returns its result and the records it sent (at most `record_bytes` bytes)."""
  iso = isolation.check(limits.namespaces, limits.allow_no_isolation)
  if not iso.namespaces:
    _sweep_once()
  # The supervisor is in the cgroup too (it forks the worker there): one more process.
  cgroup = cgroups.create(limits.cgroup, limits.memory_mb << 20, limits.max_processes + 1)
  try:
    result, records = _run(request, source, stdin, limits, record_bytes, iso, cgroup)
  finally:  # also when the run raised: its processes killed, its cgroup removed
    oom = cgroup is not None and cgroup.finish()
  if oom and result.status != "output_limit":  # the kernel's OOM killer ended a process of it
    result = dataclasses.replace(result, status="memory")
  return result, records


def _run(request, source, stdin, limits, record_bytes, iso, cgroup):
  nonce = os.urandom(channel.NONCE_BYTES)
  request = dict(
    request,
    source=source,
    nonce=nonce.hex(),
    namespaces=iso.namespaces,
    uid=iso.uid,
    timeout_s=limits.timeout_s,
    limits=_limit_spec(limits),
    disk_bytes=limits.disk_bytes,
    disk_inodes=limits.disk_inodes,
    max_processes=limits.max_processes,
    modules=isolation.child_modules(),
    site_packages=limits.site_packages,
    executable=_executable(),
    cgroup=cgroup is not None,
  )
  ours, theirs = socket.socketpair()
  record_r, record_w = os.pipe()
  try:  # a whole trace fits: the worker never waits for this process to be scheduled
    fcntl.fcntl(record_w, fcntl.F_SETPIPE_SZ, min(record_bytes, 1 << 20))
  except OSError:
    pass
  command = [
    *iso.prefix,
    sys.executable,
    "-s",
    *(() if limits.site_packages else ("-S",)),
    CHILD,
    str(theirs.fileno()),
    str(record_w),
  ]
  try:
    proc = subprocess.Popen(
      command,
      cwd="/",
      env=_environment(),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      bufsize=0,
      start_new_session=True,
      pass_fds=(theirs.fileno(), record_w),
    )
  except BaseException:
    ours.close()
    os.close(record_r)
    raise
  finally:
    theirs.close()
    os.close(record_w)
  with ours, open(record_r, "rb", buffering=0) as records:
    out = None
    try:
      _send(ours, request)
      # With a cgroup the supervisor forks the worker only once told that it is inside (so
      # is every process of the program): the move waits for the kernel while the supervisor
      # starts and builds the run's root. One gone already is told nothing.
      if cgroup is not None and cgroup.add(proc.pid):
        _send_bytes(ours, b"1")
      out = _communicate(proc, ours, records, stdin.encode("utf-8"), limits, record_bytes)
    finally:  # without namespaces, a supervisor that did not report may still be cleaning up
      _end(proc, ours, wait=not iso.namespaces and not (out and out["report"]))
  return _result(proc, out, limits), _decode(out["records"], nonce, record_bytes)


@functools.cache
def _executable() -> str:
  """The interpreter's real path (a virtualenv's python is a link the minimal root lacks)."""
  return os.path.realpath(sys.executable)


@functools.cache
def _sweep_once() -> int:
  return isolation.sweep_stale_scratch()


def _environment() -> dict[str, str]:
  # -I would ignore PYTHONHASHSEED; the environment is minimal anyway, and a fixed
  # hash seed makes set iteration (hence traces) reproducible. HOME/TMPDIR: the scratch.
  return {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONDONTWRITEBYTECODE": "1",
  }


def _limit_spec(limits: Limits) -> str:
  """'AS,CPU,FSIZE' for child.apply_limits (address space bytes, CPU s, file bytes)."""
  cpu = math.ceil(limits.cpu_s or limits.timeout_s + 1)
  return f"{limits.memory_mb << 20},{cpu},{limits.file_bytes}"


def _send(sock: socket.socket, request: dict) -> None:
  data = marshal.dumps(request)
  _send_bytes(sock, len(data).to_bytes(4, "big") + data)


def _send_bytes(sock: socket.socket, data: bytes) -> None:
  try:
    sock.sendall(data)
  except OSError:
    pass  # the child died before reading: its stderr and exit status say why


def _communicate(proc, sock, records, stdin: bytes, limits: Limits, record_bytes: int) -> dict:
  """Feeds stdin; reads stdout, stderr, records and the supervisor's report until the report
  (the worker has exited: what it wrote is in the pipes, drained then), the end of every
  stream, the deadline, or too much output. Returns the bytes read and the caller-side status."""
  streams = {
    proc.stdout.fileno(): "stdout",
    proc.stderr.fileno(): "stderr",
    records.fileno(): "records",
    sock.fileno(): "report",
  }
  out = {name: bytearray() for name in streams.values()}
  selector = selectors.DefaultSelector()
  for fd in streams:
    selector.register(fd, selectors.EVENT_READ)
  if stdin:
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
  else:
    proc.stdin.close()
  deadline, sent, status = time.monotonic() + limits.timeout_s + _GRACE_S, 0, None
  with selector:
    while (
      status is None
      and not out["report"]
      and any(k.fd in streams for k in selector.get_map().values())
    ):
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        status = "timeout"
        break
      for key, _ in selector.select(remaining):
        if key.fd in streams:
          data = os.read(key.fd, 1 << 20)
          if not data:
            selector.unregister(key.fd)
          status = _take(out, streams[key.fd], data, limits, record_bytes)
          continue
        try:
          sent += os.write(key.fd, stdin[sent : sent + (1 << 16)])
        except (BrokenPipeError, BlockingIOError) as e:
          sent = len(stdin) if isinstance(e, BrokenPipeError) else sent
        if sent >= len(stdin):
          selector.unregister(key.fd)
          proc.stdin.close()
    if status is None and out["report"]:
      for key in list(selector.get_map().values()):
        if key.fd in streams and streams[key.fd] != "report":
          status = status or _drain(out, key.fd, streams[key.fd], limits, record_bytes)
  if not proc.stdin.closed:
    proc.stdin.close()
  return dict(out, status=status)


def _take(out: dict, name: str, data: bytes, limits: Limits, record_bytes: int) -> str | None:
  """Keeps `data` read from stream `name`; 'output_limit' once stdout + stderr is too long."""
  if name != "records" or len(out[name]) <= record_bytes:
    out[name].extend(data)  # records past the cap are drained, decoded as overflow
  if len(out["stdout"]) + len(out["stderr"]) > limits.output_bytes:
    return "output_limit"
  return None


def _drain(out: dict, fd: int, name: str, limits: Limits, record_bytes: int) -> str | None:
  """Reads what is already in the pipe `fd` without waiting for its end."""
  os.set_blocking(fd, False)
  while True:
    try:
      data = os.read(fd, 1 << 20)
    except BlockingIOError:
      return None
    status = _take(out, name, data, limits, record_bytes)
    if not data or status:
      return status


def _end(proc, sock, wait: bool) -> None:
  """Ends the run: closing the socket tells the supervisor to kill everything and leave; the
  process group is then killed. The kernel's teardown of the namespaces takes a while after
  the last output: the `unshare` process is reaped by a later run rather than waited for."""
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass
  if wait:
    try:
      proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
      pass
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # before any reaping: the pid cannot be reused yet
  except (ProcessLookupError, PermissionError):
    pass
  for stream in (proc.stdout, proc.stderr):
    stream.close()
  with _UNREAPED_LOCK:
    _UNREAPED[:] = [p for p in [*_UNREAPED, proc] if p.poll() is None]


def _report(data: bytes) -> tuple[bool, int] | None:
  """The supervisor's report (timed out, wait status), or None if absent or garbled."""
  if data == b"timeout":
    return True, 0
  words = data.split()
  if len(words) == 2 and words[0] == b"exit" and words[1].isdigit() and len(words[1]) < 8:
    return False, int(words[1])
  return None


def _result(proc, out: dict, limits: Limits) -> SandboxResult:
  text_out = bytes(out["stdout"][: limits.output_bytes]).decode("utf-8", errors="replace")
  text_err = bytes(out["stderr"][: limits.output_bytes]).decode("utf-8", errors="replace")
  report = _report(bytes(out["report"]))
  if out["status"]:
    return SandboxResult(out["status"], text_out, text_err, None)
  if report is None:
    return SandboxResult(
      "error",
      text_out,
      text_err + f"\nsandbox supervisor ended without a report (exit status {proc.returncode})",
      proc.returncode,
    )
  timed_out, wait_status = report
  if timed_out:
    return SandboxResult("timeout", text_out, text_err, None)
  try:
    code = os.waitstatus_to_exitcode(wait_status)
  except ValueError:
    return SandboxResult("error", text_out, text_err, None)
  return SandboxResult(_exit_status(code, text_err), text_out, text_err, code)


def _decode(data: bytearray, nonce: bytes, record_bytes: int) -> Records:
  if len(data) > record_bytes:
    return Records([], f"more than {record_bytes} bytes of records", True)
  found, error = channel.decode(bytes(data), nonce)
  return Records(found, error, False)


def _exit_status(returncode: int, stderr: str) -> str:
  if returncode == 0:
    return "ok"
  if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
    return "timeout"  # CPU-time limit (soft, then hard)
  last = stderr.strip().rsplit("\n", 1)[-1]
  if last.startswith("MemoryError") or "Cannot allocate memory" in stderr:
    return "memory"
  if returncode == -signal.SIGXFSZ:
    return "output_limit"
  return "error"
