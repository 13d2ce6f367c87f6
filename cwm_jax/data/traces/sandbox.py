"""Runs untrusted Python in a child process with time, memory, output and network limits.

The child (`child.py`) starts in a fresh scratch directory (removed afterwards)
in its own session, with a minimal environment, `setrlimit` limits on address
space, CPU time, file size and core dumps, and the network blocked in-process
(an audit hook plus replaced `socket` functions); where `unshare --net` works
it also runs in an empty network namespace. Hitting a limit gives a status,
never an exception in the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'child.py')
STATUSES = ('ok', 'error', 'timeout', 'memory', 'output_limit')


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed run and of the trace it records."""
  timeout_s: float = 10.0  # wall clock
  cpu_s: float | None = None  # CPU time; None: timeout_s + 1
  memory_mb: int = 1024  # address space (RLIMIT_AS)
  output_bytes: int = 1_000_000  # stdout + stderr
  file_bytes: int = 64 << 20  # largest file the program may write
  max_events: int = 10_000  # traces with more line events are dropped ('too_long')
  max_trace_bytes: int = 1_000_000  # formatted trace text; larger ones are dropped
  max_value_chars: int = 1000  # longer value encodings are truncated
  network_namespace: bool = True  # also use `unshare --net` when it works
  site_packages: bool = False  # let the program import installed packages (~0.2 s slower start)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise ValueError(f'Limits.{field.name} must be positive, got {value!r}')


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  status: str  # one of STATUSES
  stdout: str
  stderr: str
  returncode: int | None


def run_python(source: str, *, stdin: str = '', limits: Limits = Limits()) -> SandboxResult:
  """Runs `source` as `__main__` in the sandbox, feeding it `stdin`."""
  result, _ = run_child({'mode': 'run'}, source, stdin=stdin, limits=limits)
  return result


def run_child(request: dict, source: str, *, stdin: str = '', limits: Limits,
              collect: str | None = None, collect_bytes: int = 0) -> tuple[SandboxResult, bytes | None]:
  """Runs child.py on `request` with `source` as program.py; returns its result and the
  first `collect_bytes` + 1 bytes of the scratch file `collect` (None if absent)."""
  scratch = tempfile.mkdtemp(prefix='cwm_sandbox_')
  try:
    with open(os.path.join(scratch, 'program.py'), 'w', encoding='utf-8') as f:
      f.write(source)
    with open(os.path.join(scratch, 'request.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(request, program='program.py'), f)
    result = _spawn(scratch, stdin.encode('utf-8'), limits)
    collected = None
    if collect and os.path.isfile(os.path.join(scratch, collect)):
      with open(os.path.join(scratch, collect), 'rb') as f:
        collected = f.read(collect_bytes + 1)
    return result, collected
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...]:
  """The command prefix that puts the child in an empty network namespace, or () if none works."""
  unshare = shutil.which('unshare')
  if not unshare:
    return ()
  prefix = (unshare, '--net') if os.geteuid() == 0 else (unshare, '--net', '--map-root-user')
  try:
    ok = subprocess.run([*prefix, 'true'], capture_output=True, timeout=10).returncode == 0
  except (OSError, subprocess.SubprocessError):
    ok = False
  return prefix if ok else ()


def _environment(scratch: str) -> dict[str, str]:
  # -I would ignore PYTHONHASHSEED; the environment is minimal anyway, and a fixed
  # hash seed makes set iteration (hence traces) reproducible.
  return {'PATH': '/usr/local/bin:/usr/bin:/bin', 'HOME': scratch, 'TMPDIR': scratch,
          'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8', 'PYTHONHASHSEED': '0',
          'PYTHONIOENCODING': 'utf-8', 'PYTHONDONTWRITEBYTECODE': '1'}


def _limit_spec(limits: Limits) -> str:
  """'AS,CPU,FSIZE' for child.apply_limits (address space bytes, CPU s, file bytes)."""
  cpu = math.ceil(limits.cpu_s or limits.timeout_s + 1)
  return f'{limits.memory_mb << 20},{cpu},{limits.file_bytes}'


def _spawn(scratch: str, stdin: bytes, limits: Limits) -> SandboxResult:
  prefix = _unshare_prefix() if limits.network_namespace else ()
  command = [*prefix, sys.executable, '-s', *(() if limits.site_packages else ('-S',)), CHILD,
             'request.json', _limit_spec(limits)]
  deadline = time.monotonic() + limits.timeout_s
  proc = subprocess.Popen(command, cwd=scratch, env=_environment(scratch), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                          start_new_session=True)
  try:
    stdout, stderr, status = _communicate(proc, stdin, limits.output_bytes, deadline)
    if status is None:
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        status = 'timeout'
  finally:
    _kill_group(proc)
  text_out = stdout[:limits.output_bytes].decode('utf-8', errors='replace')
  text_err = stderr[:limits.output_bytes].decode('utf-8', errors='replace')
  return SandboxResult(status or _exit_status(proc.returncode, text_err), text_out, text_err,
                       proc.returncode)


def _communicate(proc, stdin: bytes, max_output: int, deadline: float):
  """Feeds stdin and reads stdout/stderr until EOF, the deadline or `max_output` bytes."""
  buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
  selector = selectors.DefaultSelector()
  for fd in buffers:
    selector.register(fd, selectors.EVENT_READ)
  if stdin:
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
  else:
    proc.stdin.close()
  sent, status = 0, None
  with selector:
    while selector.get_map() and status is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        status = 'timeout'
        break
      for key, _ in selector.select(remaining):
        if key.fd in buffers:
          data = os.read(key.fd, 1 << 16)
          if not data:
            selector.unregister(key.fd)
          buffers[key.fd].extend(data)
          if sum(map(len, buffers.values())) > max_output:
            status = 'output_limit'
          continue
        try:
          sent += os.write(key.fd, stdin[sent:sent + (1 << 16)])
        except (BrokenPipeError, BlockingIOError) as e:
          sent = len(stdin) if isinstance(e, BrokenPipeError) else sent
        if sent >= len(stdin):
          selector.unregister(key.fd)
          proc.stdin.close()
  if not proc.stdin.closed:
    proc.stdin.close()
  return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), status


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # also ends anything the program started
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()
  for stream in (proc.stdout, proc.stderr):
    stream.close()


def _exit_status(returncode: int, stderr: str) -> str:
  if returncode == 0:
    return 'ok'
  if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
    return 'timeout'  # CPU-time limit (soft, then hard)
  last = stderr.strip().rsplit('\n', 1)[-1]
  if last.startswith('MemoryError') or 'Cannot allocate memory' in stderr:
    return 'memory'
  if returncode == -signal.SIGXFSZ:
    return 'output_limit'
  return 'error'
