"""The sandbox against an attacker: isolation, the trace channel, and what survives a run.

Each attack runs from a separate caller process (so a successful attack could only kill that
process, never pytest), as root and as uid 65534 ("nobody", then through a user namespace), with
namespaces available and with their absence simulated (`Limits(namespaces=False)`, which the
caller must opt into with `allow_no_isolation=True`; without it the run is refused).
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from cwm_jax.data import traces
from cwm_jax.data.traces import channel, driver, isolation, sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.geteuid() == 0
needs_namespaces = pytest.mark.skipif(
  not isolation.probe().namespaces, reason="this kernel allows no namespaces"
)
needs_root = pytest.mark.skipif(not ROOT, reason="switching to uid 65534 needs root")
# Without namespaces a root caller's program must drop to an unprivileged uid: where that uid
# cannot read the interpreter (under a 0700 /root) the fallback is refused, never run as root.
FALLBACK_REFUSED = isolation.fallback_refusal()
needs_fallback = pytest.mark.skipif(bool(FALLBACK_REFUSED), reason=FALLBACK_REFUSED or "ok")

# Runs one sandbox call in a fresh caller process; prints its result as JSON on the last line.
_CALLER = textwrap.dedent("""
    import dataclasses, json, os, sys
    from cwm_jax.data import traces
    out = []
    for kind, source, limits, extra in json.loads(sys.argv[1]):
      limits = traces.Limits(**limits)
      if kind == 'run':
        result = traces.run_python(source, limits=limits)
      elif kind == 'reward':
        from cwm_jax.infer import rewards
        result = rewards.code_reward(source, extra, limits)
      else:
        result = traces.trace_call(source, 'f', limits=limits)
      out.append(dataclasses.asdict(result))
    print(json.dumps(out), flush=True)
""")


def _unprivileged_prefix(tmp):
  """A command prefix that runs as uid 65534 with this interpreter reachable (root only).

  The base interpreter under a private folder (/root) is bound back for uid 65534; a
  checkout or virtualenv in a folder private to root (e.g. `mktemp -d`, mode 0700) cannot be,
  so those runs are skipped with that reason (a clone in an ordinary folder runs them)."""
  venv = [sys.prefix] if sys.prefix != sys.base_prefix else []  # the base is bound back below
  private = [
    p for p in (REPO, *venv) if any(not os.stat(a).st_mode & 0o001 for a in (*_ancestors(p), p))
  ]
  if private:
    pytest.skip(
      f"{private[0]} is private to root (a folder uid 65534 cannot traverse, e.g. "
      "made by `mktemp -d`): the unprivileged caller cannot import cwm_jax from it"
    )
  hidden = next((a for a in _ancestors(sys.base_prefix) if not os.stat(a).st_mode & 0o001), None)
  drop = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all"]
  if hidden is None:
    return drop
  keep = os.path.join(tmp, "keep")
  os.makedirs(keep, exist_ok=True)
  script = (
    f"mount --bind {sys.base_prefix} {keep} && mount -t tmpfs -o mode=755 tmpfs {hidden} "
    f'&& mkdir -p {sys.base_prefix} && mount --move {keep} {sys.base_prefix} && exec "$@"'
  )
  return ["unshare", "--mount", "sh", "-c", script, "sh", *drop]


def _ancestors(path):
  parts = os.path.abspath(path).split(os.sep)[1:]
  return [os.sep + os.sep.join(parts[:i]) for i in range(1, len(parts))]


def _calls(jobs, *, user="root", tmp="/tmp", env=None):
  """Results of [(kind, source, limits, extra)] run one after another by one caller process."""
  prefix = _unprivileged_prefix(tmp) if user == "nobody" else []
  command = [*prefix, sys.executable, "-c", _CALLER, json.dumps(jobs)]
  done = subprocess.run(
    command,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env or {})),
  )
  assert done.returncode == 0, f"the caller died ({done.returncode}): {done.stderr[-2000:]}"
  return json.loads(done.stdout.strip().splitlines()[-1])


def _call(kind, source, *, user="root", tmp="/tmp", env=None, extra=None, **limits):
  return _calls([(kind, source, limits, extra)], user=user, tmp=tmp, env=env)[0]


def _marker():
  return f"{random.randint(10**6, 10**7)}.{random.randint(1, 999)}"


def _alive(marker):
  """Host processes `sleep MARKER` (not the callers, whose arguments hold the marker too)."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if f.read() == b"sleep\0" + marker.encode() + b"\0":
          found.append(int(entry))
    except OSError:
      pass
  return found


def _parent(pid):
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return int(f.read().rsplit(b")", 1)[1].split()[1])
  except OSError:
    return None


def _gone(marker, within_s=20.0):
  deadline = time.monotonic() + within_s  # a fail-safe: they are normally gone at once
  while _alive(marker) and time.monotonic() < deadline:
    time.sleep(0.1)
  return not _alive(marker)


_ESCAPE = """
import os, subprocess, sys
subprocess.Popen(['sleep', '{m}'], start_new_session=True)  # setsid
if os.fork() == 0:
    os.setpgid(0, 0)
    os.execvp('sleep', ['sleep', '{m}'])
{kill}
print('still here')
"""
# Inside namespaces the program may try its worst: the caller is out of sight and reach.
_KILL = """
for pid in (os.getppid(), -1):  # the parent; then everything it may signal
    try:
        os.kill(pid, 9)
    except OSError:
        pass
"""


def _escape(marker, kill=_KILL):
  return _ESCAPE.format(m=marker, kill=kill)


@needs_namespaces
@pytest.mark.parametrize("user", ["root", pytest.param("nobody", marks=needs_root)])
def test_killing_the_caller_and_escaping_children_fail(user, tmp_path):
  marker = _marker()
  trace_program = "def f():\n    exec(" + repr(_escape(marker)) + ")\n    return 1\n"
  for kind, source in (("run", _escape(marker)), ("trace", trace_program)):
    result = _call(kind, source, user=user, tmp=str(tmp_path))
    assert _gone(marker), f"{kind}: processes of the run survive it"
    assert result["status"] == "ok", result  # PID 1 of the namespace ignores the kill
    assert kind == "trace" or result["stdout"] == "still here\n"


@pytest.mark.parametrize(
  "user", [pytest.param("root", marks=needs_fallback), pytest.param("nobody", marks=needs_root)]
)
def test_without_namespaces_children_still_die_with_the_run(user, tmp_path):
  """The opt-in fallback: the supervisor is a subreaper and kills what the program left."""
  marker = _marker()
  result = _call(
    "run",
    _escape(marker, kill=""),
    user=user,
    tmp=str(tmp_path),
    namespaces=False,
    allow_no_isolation=True,
  )
  assert result["status"] == "ok" and result["stdout"] == "still here\n", result
  assert _gone(marker)


@pytest.mark.parametrize("namespaces", [True, False])
def test_refused_without_isolation_unless_opted_in(namespaces, monkeypatch):
  absent = isolation.Isolation(False, (), None, "simulated: unshare is not permitted")
  monkeypatch.setattr(isolation, "probe", lambda: absent)
  with pytest.raises(traces.SandboxRefused, match="allow_no_isolation"):
    traces.run_python("print(1)", limits=traces.Limits(namespaces=namespaces))
  with pytest.raises(traces.SandboxRefused, match="network isolation"):
    traces.trace_call("def f():\n    return 1\n", "f")
  if FALLBACK_REFUSED:
    with pytest.raises(traces.SandboxRefused, match="as root"):
      traces.run_python("print(1)", limits=traces.Limits(allow_no_isolation=True))
    return
  opted = traces.run_python("print(1)", limits=traces.Limits(allow_no_isolation=True))
  assert opted.status == "ok" and opted.stdout == "1\n"


@needs_namespaces
@pytest.mark.parametrize("user", ["root", pytest.param("nobody", marks=needs_root)])
def test_no_network_no_other_processes_no_privileges(user, tmp_path):
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  listener.setblocking(False)
  port = listener.getsockname()[1]
  program = textwrap.dedent(f"""
      import os, subprocess, sys
      # a fresh interpreter has no audit hook and no patched socket module
      connect = 'import socket; socket.create_connection(("127.0.0.1", {port}), timeout=2)'
      net = subprocess.run([sys.executable, '-c', connect], capture_output=True)
      print('net', net.returncode)
      print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
      enter = subprocess.run(['nsenter', '-t', '1', '-n', '-m', 'true'], capture_output=True)
      print('nsenter', enter.returncode)
      seen = b''
      for pid in os.listdir('/proc'):
          try:
              seen += open(f'/proc/{{pid}}/environ', 'rb').read()
          except OSError:
              pass
      print('secret seen' if b'hunter' + b'2' in seen else 'secret unseen')
      print('run', os.listdir('/run') if os.path.isdir('/run') else [])
      for path in ('/etc/passwd-x', os.path.expanduser('~/x'), '/var/tmp/x', '/dev/shm/x'):
          try:
              open(path, 'w').write('x')
              print('wrote', path)
          except OSError as e:
              print('denied', path)
  """)
  result = _call("run", program, user=user, tmp=str(tmp_path), env={"CWM_SECRET": "hunter2"})
  out = result["stdout"]
  assert result["status"] == "ok", result
  assert "net 1" in out and "Network is unreachable" not in out
  with pytest.raises(BlockingIOError):
    listener.accept()  # nothing reached the host's listener
  pids = json.loads(out.split("pids ")[1].split("\n")[0])
  assert pids[0] == 1 and len(pids) <= 3, pids  # the program (PID 1) and its children only
  assert "nsenter 0" not in out and "secret unseen" in out  # the caller's environment
  assert "run []" in out  # no host sockets under /run
  assert "denied /etc/passwd-x" in out and "hunter2" not in out


@needs_namespaces
@pytest.mark.parametrize("user", ["root", pytest.param("nobody", marks=needs_root)])
def test_the_program_sees_a_minimal_root(user, tmp_path):
  """Hidden tests on the host's disk (a task file, the checkout, home directories) are out of
  sight: the program walks its whole filesystem and finds no trace of them (the controls:
  the standard library imports, /bin/sh runs, the scratch is writable)."""
  marker = f"assert factorial(5) == {_marker()}"
  tasks = tmp_path / "task_set.jsonl"
  tasks.write_text(json.dumps({"tests": marker}) + "\n")
  os.chmod(tmp_path, 0o755)
  os.chmod(tasks, 0o644)
  program = textwrap.dedent(f"""
      import json, os, subprocess
      found = []
      for top, dirs, files in os.walk('/'):
          if top == '/proc' or top.startswith('/proc/'):
              dirs[:] = []
              continue
          for name in files:
              path = os.path.join(top, name)
              if name.endswith(('.jsonl', '.json')) and os.path.isfile(path):
                  try:
                      if {marker.split("== ")[1]!r} in open(path, errors='replace').read():
                          found.append(path)
                  except OSError:
                      pass
      print('found', found)
      print('tops', sorted(os.listdir('/')))
      for path in ({str(tasks)!r}, {REPO!r}, '/home', '/root/.ssh', '/etc/shadow', '/run'):
          print(path, os.path.exists(path))
      print(subprocess.run(['/bin/sh', '-c', 'echo sh ok > x && cat x'], capture_output=True,
                           text=True).stdout.strip(), json.dumps([1]))
  """)
  result = _call("run", program, user=user, tmp=str(tmp_path), timeout_s=60)
  out = result["stdout"]
  assert result["status"] == "ok", result
  assert "found []" in out and "sh ok [1]" in out, out
  for path in (str(tasks), REPO, "/home", "/root/.ssh", "/etc/shadow", "/run"):
    assert f"{path} False" in out, out
  tops = set(json.loads(out.split("tops ")[1].split("\n")[0].replace("'", '"')))
  assert tops <= {
    "bin",
    "sbin",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "usr",
    "etc",
    "dev",
    "proc",
    "tmp",
    "var",
    *[p.split("/")[1] for p in (sys.base_prefix, sys.prefix)],
  }, tops


@needs_namespaces
def test_disk_writes_are_capped_and_scratch_disappears():
  program = textwrap.dedent("""
      import os
      total = 0
      try:
          for i in range(1000):
              with open(f'f{i}', 'wb') as f:
                  f.write(b'x' * (1 << 20))
              total += 1 << 20
      except OSError as e:
          print(type(e).__name__, e.errno)
      print(total, os.getcwd())
  """)
  result = traces.run_python(program, limits=traces.Limits(disk_bytes=8 << 20))
  assert result.status == "ok", result
  total, cwd = result.stdout.split()[-2:]
  assert "OSError 28" in result.stdout and int(total) <= 8 << 20  # ENOSPC at the cap
  assert not os.path.exists(os.path.join(cwd, "f0"))  # the files were never on the host


@needs_namespaces
def test_process_count_is_capped():
  program = textwrap.dedent("""
      import os, time
      started = 0
      for _ in range(100):  # bounded: a failing cap cannot turn this into a fork bomb
          try:
              if os.fork() == 0:
                  time.sleep(3)
                  os._exit(0)
              started += 1
          except OSError:
              break
      print(started)
  """)
  result = traces.run_python(program, limits=traces.Limits(max_processes=20))
  assert result.status == "ok" and int(result.stdout) < 20, result


_LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@needs_namespaces
def test_no_nested_namespaces_mounts_or_memfd():
  program = _LIBC + textwrap.dedent("""
      import subprocess, threading
      for name, flag in (('user', 0x10000000), ('mount', 0x20000), ('ipc', 0x08000000)):
          print(name, libc.unshare(flag), ctypes.get_errno())
      nested = subprocess.run(['unshare', '-Urm', 'sh', '-c', 'mount -t tmpfs t /tmp && echo in'],
                              capture_output=True, text=True)
      print('nested', nested.returncode, nested.stdout.strip() or '-')
      try:
          os.memfd_create('x')
          print('memfd yes')
      except OSError as e:
          print('memfd', e.errno)
      # the controls: threads (clone3 falls back to clone) and subprocesses still work
      done = []
      thread = threading.Thread(target=done.append, args=(1,))
      thread.start()
      thread.join()
      print('thread', done, subprocess.run(['echo', 'child'], capture_output=True,
                                           text=True).stdout.strip())
  """)
  result = traces.run_python(program)
  assert result.status == "ok", result
  out = result.stdout
  for name in ("user", "mount", "ipc"):
    assert f"{name} -1 1\n" in out  # EPERM
  assert "nested 1 -" in out and "memfd 1" in out and "thread [1] child" in out, out


@needs_namespaces
def test_each_run_has_its_own_capped_ipc_namespace():
  shm = _LIBC + textwrap.dedent("""
      libc.shmget.restype = ctypes.c_int
      key = 0x5eed
      found = libc.shmget(key, 0, 0)
      print('found', found)
      big = libc.shmget(0x5eee, 64 << 20, 0o1666)  # IPC_CREAT | 0666, past the cap
      print('big', big, ctypes.get_errno())
      small = libc.shmget(key, 1 << 20, 0o1666)
      print('small', small >= 0)
      queue = libc.msgget(key, 0o1666)
      print('queue', queue >= 0)
  """)
  first = traces.run_python(shm, limits=traces.Limits(disk_bytes=16 << 20))
  second = traces.run_python(shm, limits=traces.Limits(disk_bytes=16 << 20))
  for result in (first, second):  # the second run sees nothing the first one left
    assert result.status == "ok", result
    lines = result.stdout.split("\n")
    assert lines[0] == "found -1" and lines[2:4] == ["small True", "queue True"], lines
    assert lines[1] == "big -1 28", lines  # ENOSPC: past the namespace's shmall


@needs_namespaces
@needs_root
def test_one_runs_processes_do_not_limit_another():
  """RLIMIT_NPROC counts per uid: every run has a uid of its own, so a run that holds all of
  its processes leaves a concurrent run's untouched (the controls: both runs fork)."""
  import threading  # pylint: disable=import-outside-toplevel

  hog = textwrap.dedent("""
      import os, time
      for _ in range(40):
          try:
              if os.fork() == 0:
                  time.sleep(600)
                  os._exit(0)
          except OSError:
              break
      time.sleep(600)
  """)
  results = {}
  thread = threading.Thread(
    target=lambda: results.update(
      hog=traces.run_python(hog, limits=traces.Limits(max_processes=10, timeout_s=600))
    )
  )
  thread.start()
  deadline = time.monotonic() + 120  # a fail-safe: the hog is normally full at once
  while time.monotonic() < deadline and not _uid_with(9):
    time.sleep(0.05)
  uid = _uid_with(9)
  assert uid is not None and uid >= isolation.UID_BASE
  honest = traces.run_python(
    "import subprocess\nfor _ in range(5):\n"
    '    subprocess.run(["true"], check=True)\nimport os\n'
    "print(os.getuid())\n",
    limits=traces.Limits(max_processes=10),
  )
  for pid in _pids_of(uid):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  thread.join()
  assert honest.status == "ok" and int(honest.stdout) not in (uid, 0), honest
  assert results["hog"].status != "ok"  # killed from outside


def _pids_of(uid):
  found = []
  for entry in os.listdir("/proc"):
    try:
      if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
        found.append(int(entry))
    except OSError:
      pass
  return found


def _uid_with(count):
  """A sandbox uid that owns at least `count` processes on the host, or None."""
  uids = {}
  for entry in os.listdir("/proc"):
    try:
      uid = os.stat(f"/proc/{entry}").st_uid if entry.isdigit() else -1
    except OSError:
      continue
    if uid >= isolation.UID_BASE:
      uids[uid] = uids.get(uid, 0) + 1
  return next((u for u, n in uids.items() if n >= count), None)


def test_root_never_runs_the_program_as_root(monkeypatch):
  """Without namespaces a root caller's program must drop to its own uid; where that uid
  could not read the interpreter, the run is refused instead of running as root."""
  if not ROOT:
    pytest.skip("the caller is not root")
  absent = isolation.Isolation(False, (), isolation.UID_BASE, "simulated: no namespaces")
  monkeypatch.setattr(isolation, "probe", lambda: absent)
  limits = traces.Limits(allow_no_isolation=True)
  if not FALLBACK_REFUSED:
    done = traces.run_python("import os\nprint(os.getuid(), os.geteuid())", limits=limits)
    uids = set(map(int, done.stdout.split())) if done.status == "ok" else set()
    assert done.status == "ok" and len(uids) == 1 and min(uids) >= isolation.UID_BASE, done
  monkeypatch.setattr(isolation, "_traversable", lambda path: False)
  with pytest.raises(traces.SandboxRefused, match="as root"):
    traces.run_python("print(1)", limits=limits)


def test_scratch_and_processes_end_when_the_caller_is_killed(tmp_path):
  modes = [True] if isolation.probe().namespaces else []
  for namespaces in modes + ([] if FALLBACK_REFUSED else [False]):
    marker, before = _marker(), set(os.listdir("/tmp"))
    program = (
      f'import subprocess, time\nsubprocess.Popen(["sleep", "{marker}"], '
      'start_new_session=True)\nprint("started", flush=True)\ntime.sleep(60)\n'
    )
    caller = subprocess.Popen(
      [
        sys.executable,
        "-c",
        _CALLER,
        json.dumps(
          [
            [
              "run",
              program,
              {"namespaces": namespaces, "allow_no_isolation": True, "timeout_s": 60},
              None,
            ]
          ]
        ),
      ],
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO),
      stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not _alive(marker) and time.monotonic() < deadline:
      time.sleep(0.05)
    scratch = [
      p
      for p in set(os.listdir("/tmp")) - before  # named by their supervisor's pid
      if re.fullmatch(r"cwm_sandbox_\d+_\w+", p) and _parent(int(p.split("_")[2])) == (caller.pid)
    ]
    assert bool(scratch) == (not namespaces)  # with namespaces it never shows on the host
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    caller.stdout.close()
    assert _gone(marker), "the run outlived its killed caller"
    deadline = time.monotonic() + 20
    while any(os.path.exists(os.path.join("/tmp", p)) for p in scratch) and (
      time.monotonic() < deadline
    ):
      time.sleep(0.05)
    assert not any(os.path.exists(os.path.join("/tmp", p)) for p in scratch)


def test_a_run_ends_as_python_would():
  program = (
    'import atexit, sys, threading, time\natexit.register(print, "bye")\n'
    'def late():\n    time.sleep(0.2)\n    print("thread")\n'
    'threading.Thread(target=late).start()\nprint("main")\n'
  )
  for tail, code in (("", 0), ("sys.exit(3)\n", 3), ("1 / 0\n", 1)):
    expected = subprocess.run(
      [sys.executable, "-c", program + tail], capture_output=True, text=True, timeout=60
    )
    result = traces.run_python(program + tail)
    assert (
      (result.stdout, result.returncode)
      == (expected.stdout, expected.returncode)
      == ("main\nthread\nbye\n", code)
    )


def test_stale_scratch_is_swept(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = os.path.join("/tmp", f"cwm_sandbox_{dead.pid}_test")
  os.makedirs(os.path.join(stale, "sub"))
  assert isolation.sweep_stale_scratch() >= 1 and not os.path.exists(stale)


# --- the trace channel ---------------------------------------------------------------------------

_SIMPLE = "def f():\n    x = 1\n    return x + 1\n"


def _trace(source, **limits):
  return traces.trace_call(source, "f", limits=traces.Limits(**limits))


@pytest.mark.parametrize("namespaces", [True, pytest.param(False, marks=needs_fallback)])
def test_the_program_cannot_forge_or_suppress_its_trace(namespaces):
  limits = dict(namespaces=namespaces, allow_no_isolation=True)
  honest = _trace(_SIMPLE, **limits)
  assert honest.status == "ok" and [f["event"] for f in honest.frames] == [
    "call",
    "line",
    "line",
    "return",
  ]
  forged_file = (
    'import json, os\njson.dump({"status": "ok", "frames": [], "message": ""}, '
    'open("result.json", "w"))\nos._exit(0)\n' + _SIMPLE
  )
  assert _trace(forged_file, **limits).status == "error"
  patched = (
    'import json, sys\njson.dump = json.dumps = lambda *a, **k: "{}"\n'
    "sys.settrace = lambda f: None\n" + _SIMPLE
  )
  result = _trace(patched, **limits)
  assert result.status == "ok" and [(f["event"], f["lineno"] - 3) for f in result.frames] == [
    (f["event"], f["lineno"]) for f in honest.frames
  ]
  spray = (
    'import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b"\\x00" * 16 + '
    'b"\\x00\\x00\\x00\\x02{}")\n    except OSError:\n        pass\n' + _SIMPLE
  )
  sprayed = _trace(spray, **limits)
  assert sprayed.status == "error" and "nonce" in sprayed.message
  cut = "import sys\ndef f():\n    sys.settrace(None)\n    return 1\n"
  unbalanced = _trace(cut, **limits)
  assert unbalanced.status == "error" and "never returned" in unbalanced.message
  quits = "import os\ndef f():\n    os._exit(0)\n"
  assert _trace(quits, **limits).status == "error"


_ENCODER_SWAP = (  # rewrites every local and returned value of the record it encodes
  "import json\nclass Enc(json.JSONEncoder):\n    def encode(self, o):\n"
  '        if "frames" in o:\n            o = dict(o, frames=[dict(fr, value=fr["value"] and "99",'
  ' locals=fr["locals"] and {k: "7" for k in fr["locals"]}) for fr in o["frames"]])\n'
  "        return super().encode(o)\njson.JSONEncoder = Enc\n"
)
_LOOKUP_SWAP = (  # replaces what an encoder could look up when it runs
  "import builtins, json, json.encoder, math, re\n"
  "json.encoder.encode_basestring = json.encoder.c_encode_basestring = lambda s: '\"x\"'\n"
  'json.encoder.c_make_encoder = None\njson.dumps = lambda *a, **k: "{}"\n'
  'builtins.repr = lambda v: "forged"\nbuiltins.type = lambda v: str\n'
  "math.isfinite = lambda v: False\nre.compile = None\n"
)


@pytest.mark.parametrize("namespaces", [True, pytest.param(False, marks=needs_fallback)])
def test_replacing_encoders_and_builtins_changes_no_trace_record(namespaces):
  source = 'def f():\n    x = [1, "\u00e9", 2.5, {"k": None}]\n    return x + [True]\n'
  limits = dict(namespaces=namespaces, allow_no_isolation=True)
  honest = _trace(source, **limits)
  assert honest.status == "ok" and honest.frames[-1]["value"] == (
    '[1, "\u00e9", 2.5, {"k": null}, true]'
  )
  for attack in (_ENCODER_SWAP, _LOOKUP_SWAP):
    shift = attack.count("\n")
    result = _trace(attack + source, **limits)
    assert result.status == "ok", result.message
    assert [dict(f, lineno=f["lineno"] - shift) for f in result.frames] == honest.frames


@needs_root
@pytest.mark.parametrize("namespaces", [True, False])
def test_as_nobody_traces_and_verdicts_cannot_be_forged(namespaces, tmp_path):
  if namespaces and not isolation.probe().namespaces:
    pytest.skip("no namespaces here")
  limits = dict(namespaces=namespaces, allow_no_isolation=not namespaces)
  spray = (
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, bytes(20))\n"
    "    except OSError:\n        pass\nos._exit(0)\n" + _SIMPLE
  )
  tests = "assert add(2, 3) == 5\nassert add(1, 1) == 2"
  hacks = ("exit()", "import os\nos._exit(0)", 'print("2 passed")\nraise SystemExit(0)')
  jobs = [
    ("trace", _SIMPLE, limits, None),
    ("trace", spray, limits, None),
    ("reward", "def add(a, b):\n    return a + b\n", limits, tests),
  ]
  jobs += [("reward", "def add(a, b):\n    return 0\n" + hack, limits, tests) for hack in hacks]
  honest, sprayed, good, *hacked = _calls(jobs, user="nobody", tmp=str(tmp_path))
  assert honest["status"] == "ok" and len(honest["frames"]) == 4, honest
  assert sprayed["status"] == "error"
  assert good["value"] == 1 and [r["value"] for r in hacked] == [-1] * len(hacks), hacked


def _frames(*events):
  return [
    {
      "event": e,
      "lineno": n,
      "line": line,
      "locals": {} if e in ("call", "line") else None,
      "value": None if e in ("call", "line") else "1",
    }
    for e, n, line in events
  ]


def test_strict_parsing_turns_every_defect_into_an_error():
  lines = _SIMPLE.split("\n")
  good = _frames(("call", 1, lines[0]), ("line", 2, lines[1]), ("return", 3, lines[2]))
  assert driver.frames_problem(good, lines) == ""
  bad = {
    "no frames": [],
    "line outside": _frames(("call", 1, lines[0]), ("line", 99, ""), ("return", 3, lines[2])),
    "line text": _frames(("call", 1, lines[0]), ("line", 2, "forged"), ("return", 3, lines[2])),
    "nesting": _frames(("line", 2, lines[1])),
    "unclosed": _frames(("call", 1, lines[0]), ("line", 2, lines[1])),
    "event": _frames(("jump", 1, lines[0])),
    "lineno type": [dict(good[0], lineno=True)] + good[1:],
    "locals type": [dict(good[0], locals=[1])] + good[1:],
    "extra key": [dict(good[0], extra=1)] + good[1:],
  }
  for name, frames in bad.items():
    assert driver.frames_problem(frames, lines), name
  records = [
    [],
    [{"status": "ok"}],
    [{"status": "pwned", "frames": [], "message": ""}],
    [{"status": "ok", "frames": "x", "message": ""}],
    [{"status": "too_long", "frames": good, "message": ""}],
    [{"status": "ok", "frames": good, "message": ""}] * 2,
  ]
  for rs in records:
    assert driver._checked(rs, _SIMPLE).status == "error", rs
  assert driver._checked([{"status": "ok", "frames": good, "message": ""}], _SIMPLE).status == "ok"


def test_channel_decode_never_raises():
  nonce = os.urandom(channel.NONCE_BYTES)
  good = nonce + (8).to_bytes(4, "big") + b'{"a": 1}'
  assert channel.decode(good, nonce) == ([{"a": 1}], "")
  assert channel.decode(nonce + (7).to_bytes(4, "big") + b'{"a": 1', nonce)[1]  # not JSON
  assert channel.decode(good + good[:10], nonce)[1] == "a record header is cut short"
  assert "nonce" in channel.decode(good, os.urandom(channel.NONCE_BYTES))[1]
  assert channel.decode(nonce + (3).to_bytes(4, "big") + b"[1]", nonce)[1]  # not an object
  assert channel.decode(nonce + (99).to_bytes(4, "big") + b"{}", nonce)[1]  # cut short
  rng = random.Random(0)
  for _ in range(300):
    blob = nonce + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    records, error = channel.decode(blob, nonce)
    assert isinstance(records, list) and isinstance(error, str)


# --- the command line ----------------------------------------------------------------------------


def _cli(*argv, prefix=()):
  return subprocess.run(
    [*prefix, sys.executable, "-m", "cwm_jax.trace", *argv],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
  )


@needs_namespaces
@needs_root
def test_cli_attacks_as_nobody(tmp_path):
  shared = tempfile.mkdtemp(prefix="cwm_cli_test_")  # readable by uid 65534, unlike tmp_path
  try:
    os.chmod(shared, 0o755)
    marker = _marker()
    attack = os.path.join(shared, "attack.py")
    with open(attack, "w", encoding="utf-8") as f:
      f.write("def f():\n    exec(" + repr(_escape(marker)) + ")\n    return 1\n")
    os.chmod(attack, 0o644)
    prefix = _unprivileged_prefix(str(tmp_path))
    info = json.loads(_cli("--sandbox_info", prefix=prefix).stdout)
    assert info["namespaces"] and info["user_namespace"] and info["program_uid"] == 65534
    done = _cli(f"{attack}:f", prefix=prefix)
    assert done.returncode == 0 and "<|call_sep|>" in done.stdout, done.stderr[-2000:]
    assert _gone(marker)
  finally:
    shutil.rmtree(shared, ignore_errors=True)


def test_cli_sandbox_info_and_attacks(tmp_path):
  info = _cli("--sandbox_info")
  assert info.returncode == 0, info.stderr
  described = json.loads(info.stdout)
  assert described["namespaces"] == isolation.probe().namespaces
  assert described["program_uid"] == ("per run" if ROOT else os.geteuid())
  marker = _marker()
  path = tmp_path / "attack.py"
  path.write_text("def f():\n    exec(" + repr(_escape(marker)) + ")\n    return 1\n")
  if isolation.probe().namespaces:  # (without them, kill(-1) as root would end this machine)
    done = _cli(f"{path}:f")
    assert done.returncode == 0 and _gone(marker), done.stderr
  forged = tmp_path / "forged.py"
  forged.write_text('import os\nos.write(4, b"x" * 100)\nos._exit(0)\ndef f():\n    return 1\n')
  done = _cli(f"{forged}:f", *(() if isolation.probe().namespaces else ("--allow_no_isolation",)))
  assert done.returncode == 1 and "trace error" in done.stderr
  if isolation.probe().namespaces:
    refused = _cli(f"{path}:f", "--nonamespaces")
    assert refused.returncode == 2 and "allow_no_isolation" in refused.stderr


def test_cli_refuses_bad_inputs_with_one_line(tmp_path):
  """Each bad input exits 2 at once with one line on stderr: a FIFO is not waited on,
  /dev/zero is not read, parser-exhausting literals and absurd limits are not tracebacks."""
  program = tmp_path / "p.py"
  program.write_text("def f(*a):\n    return len(a)\n")
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  big = tmp_path / "big.py"
  big.write_text("#" * ((1 << 20) + 1))
  cases = {
    "fifo": (f"{fifo}:f",),
    "/dev/zero": ("/dev/zero:f",),
    "directory": (f"{tmp_path}:f",),
    "too large": (f"{big}:f",),
    "missing": (f"{tmp_path}/nope.py:f",),
    "unary minuses": (f"{program}:f", "--args", "-" * 100_000 + "1"),
    "+ chain": (f"{program}:f", "--args", "(" + "+".join(["1"] * 60_000) + ",)"),
    "nesting": (f"{program}:f", "--kwargs", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
    "timeout inf": (f"{program}:f", "--timeout_s", "inf"),
    "timeout nan": (f"{program}:f", "--timeout_s", "nan"),
    "huge memory": (f"{program}:f", "--memory_mb", str(10**17)),
  }
  for name, argv in cases.items():
    done = _cli(*argv)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      name,
      done.returncode,
      done.stderr[-500:],
    )
    assert "Traceback" not in done.stderr, name
  ok = _cli(
    f"{program}:f",
    "--args",
    "(1, 2)",
    "--format",
    "json",
    *(() if isolation.probe().namespaces else ("--allow_no_isolation",)),
  )
  assert ok.returncode == 0 and json.loads(ok.stdout)[-1]["value"] == "2", ok.stderr


def test_sandbox_info_matches_the_kernel():
  info = isolation.probe().describe()
  works = (
    subprocess.run(
      [
        "unshare",
        *(() if ROOT else ("--user", "--map-root-user")),
        "--pid",
        "--fork",
        "--mount-proc",
        "--net",
        "--mount",
        "--ipc",
        "true",
      ],
      capture_output=True,
    ).returncode
    == 0
    if shutil.which("unshare")
    else False
  )
  assert info["namespaces"] == works and info["network_isolated"] == works
  if works and ROOT:
    assert info["program_uid"] == "per run" and info["read_only"] and info["seccomp"]
  assert sandbox.Limits().allow_no_isolation is False
