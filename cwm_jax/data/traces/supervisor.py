"""The sandbox's supervisor: isolates the run, starts the worker, outlives the program.

Run by child.py (started by sandbox.py as `python -s [-S] child.py SOCKET_FD RECORD_FD`), under
`unshare --pid --net --mount [--user --map-root-user]` where the kernel allows it: this
process is in fresh mount and network namespaces, and the worker it forks is PID 1 of a fresh
PID namespace with its own /proc, so the program can neither see nor signal the caller or
this process, and every process it starts dies when the worker does. Stdlib only: the
package is not importable here. Steps:
  1. child.py reads the request from the caller's socket; the socket doubles as a lifeline:
     its end of file means the caller is gone, and the run is ended;
  2. namespaces: make every mount read-only, hide /run (host sockets) under an empty tmpfs,
     mount a size-capped tmpfs on /tmp (also bound on /dev/shm and /var/tmp) holding the
     scratch directory, and re-expose the interpreter's directories hidden behind private
     ones (e.g. /root) read-only for the dropped uid;
     otherwise (an explicit opt-in) a scratch directory in the host's temp dir;
  3. fork the worker: killed if this process dies, its own session, a private /proc, no
     capabilities, no_new_privs, uid 65534 for root callers, setrlimit limits, the network
     blocked, then worker.py runs the program;
  4. wait for it, the deadline or the caller's end; kill every process of the run (with
     namespaces: the worker, PID 1; without: as subreaper, everything it left);
     report 'exit WAIT_STATUS' or 'timeout' on the socket and exit.
As PID 1 the program ignores signals it sends itself without a handler, so its CPU limit
ends it with the hard limit's SIGKILL. `child.py --probe` checks steps 2-3 (JSON on stdout).
"""

import ctypes
import gc
import os
import resource
import select
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRATCH = '/tmp/sandbox'
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 1, 4, 24
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_MS_NOEXEC = 8
_SIGKILL = 9
_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
  _fields_ = [('attr_set', ctypes.c_uint64), ('attr_clr', ctypes.c_uint64),
              ('propagation', ctypes.c_uint64), ('userns_fd', ctypes.c_uint64)]


def _check(result, what):
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, '%s: %s' % (what, os.strerror(errno)))


def _mount(source, target, fstype, flags, data=None):
  _check(_libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), 'mount %s' % target)


def _read_only_everywhere():
  """Makes every mount of this namespace read-only (mount_setattr, Linux >= 5.12)."""
  attr = _MountAttr(1 | 2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
  number = {'x86_64': 442, 'aarch64': 442}.get(os.uname().machine)
  if number is None:
    return False
  return _libc.syscall(number, -100, b'/', 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)) == 0


def _hidden_ancestor(path, uid):
  """The highest ancestor of `path` that `uid` (not root) may not traverse, or None."""
  if uid is None:
    return None
  parts = os.path.abspath(path).split(os.sep)[1:]
  for i in range(1, len(parts)):
    ancestor = os.sep + os.sep.join(parts[:i])
    if not os.stat(ancestor).st_mode & 0o001:
      return ancestor
  return None


def _expose(paths, uid):
  """Covers private directories (e.g. /root) with an empty tmpfs, then binds `paths` back."""
  hidden = {}
  for path in paths:
    ancestor = _hidden_ancestor(path, uid)
    if ancestor and os.path.isdir(path):
      hidden.setdefault(ancestor, []).append((path, os.open(path, os.O_PATH)))
  for ancestor, binds in hidden.items():
    _mount('tmpfs', ancestor, 'tmpfs', _MS_NOSUID | _MS_NODEV, 'size=64k,mode=755')
    for path, fd in binds:
      os.makedirs(path, exist_ok=True)
      _mount('/proc/self/fd/%d' % fd, path, None, _MS_BIND | _MS_REC)
      os.close(fd)
  return sorted(p for binds in hidden.values() for p, _ in binds)


def _isolated_scratch(request):
  """The namespace's filesystem: read-only, a capped tmpfs on /tmp; returns (scratch, notes)."""
  read_only = _read_only_everywhere()
  uid = request.get('uid')
  venv = os.path.dirname(os.path.dirname(sys.executable))  # what `sys.executable` runs from
  home = venv if os.path.isfile(os.path.join(venv, 'pyvenv.cfg')) else os.path.dirname(
      sys.executable)
  needed = sorted({sys.base_prefix, sys.prefix, home, _HERE})
  exposed = _expose(needed, uid)
  if os.path.isdir('/run'):  # hides the host's unix sockets (e.g. a user's D-Bus session)
    _mount('tmpfs', '/run', 'tmpfs', _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, 'size=16k,mode=755')
  # The interpreter, a virtualenv or this package may live under /tmp (a checkout there):
  # bind them back (read-only, as their mounts) over the scratch tmpfs that covers /tmp.
  under_tmp = [(p, os.open(p, os.O_PATH)) for p in needed
               if p == '/tmp' or p.startswith('/tmp/')]
  _mount('tmpfs', '/tmp', 'tmpfs', _MS_NOSUID | _MS_NODEV,
         'size=%d,nr_inodes=%d,mode=1777' % (request['disk_bytes'], request['disk_inodes']))
  for path, fd in under_tmp:
    os.makedirs(path, mode=0o755, exist_ok=True)
    _mount('/proc/self/fd/%d' % fd, path, None, _MS_BIND | _MS_REC)
    os.close(fd)
  for target in ('/dev/shm', '/var/tmp'):
    if os.path.isdir(target):
      source = '/tmp/.%s' % os.path.basename(target)
      os.mkdir(source, 0o1777)
      os.chmod(source, 0o1777)
      _mount(source, target, None, _MS_BIND)
  os.mkdir(_SCRATCH, 0o700)
  return _SCRATCH, {'read_only': read_only, 'exposed': exposed}


def _prepare(request):
  if request['namespaces']:
    scratch, _ = _isolated_scratch(request)
  else:
    import tempfile  # pylint: disable=g-import-not-at-top
    scratch = tempfile.mkdtemp(prefix='cwm_sandbox_%d_' % os.getpid(), dir='/tmp')
  with open(os.path.join(scratch, 'program.py'), 'w', encoding='utf-8') as f:
    f.write(request['source'])
  if request.get('uid') is not None:
    for path in (scratch, os.path.join(scratch, 'program.py')):
      os.chown(path, request['uid'], request['uid'])
  return scratch


def drop_privileges(uid):
  """No capabilities (bounding set too), uid `uid` if given, no_new_privs: for the worker."""
  for cap in range(64):
    if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
      break  # EINVAL: past the last capability; EPERM: not privileged, nothing to drop
  if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)
  _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), 'capset')
  _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 'no_new_privs')
  _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def apply_limits(spec, processes=None):
  """Applies 'AS,CPU,FSIZE' resource limits (bytes, seconds, bytes) to this process, and
  RLIMIT_NPROC (processes of its uid) when given."""
  memory, cpu, fsize = (int(v) for v in spec.split(','))
  resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  if processes:
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _start_worker(request, sock, record_fd, scratch, load):
  worker = load('worker')
  gc.freeze()  # the worker's collections then leave the pages it shares with us alone
  pid = os.fork()
  if pid:
    os.close(record_fd)
    return pid
  try:
    os.close(sock)
    _libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)  # ends with this process, whatever happens
    os.setsid()  # kill(0, ...) by the program reaches its own processes only
    if request['namespaces']:  # PID 1 of the new PID namespace: its own /proc
      _mount('proc', '/proc', 'proc', _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    drop_privileges(request.get('uid'))
    os.chdir(scratch)
    os.environ.update(HOME=scratch, TMPDIR=scratch)
    # Processes are counted per uid: only the dropped uid or a fresh user namespace is ours.
    own_uid = request['namespaces'] or request.get('uid') is not None
    apply_limits(request['limits'], request['max_processes'] if own_uid else None)
    worker.main(request, record_fd, load)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xff)
  except MemoryError:
    print('MemoryError', file=sys.stderr)  # the caller's 'memory' status
    os._exit(1)
  except BaseException as e:  # the worker's own failure: say so, never fall back into this
    print('sandbox worker failed: %r' % e, file=sys.stderr)
    os._exit(70)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def _wait(pid, sock, timeout_s):
  """(wait status or None, timed_out, caller_gone) once the worker exits or the run must end."""
  try:
    pidfd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    pidfd = None
  deadline = time.monotonic() + timeout_s
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return None, True, False
    watch = [sock] + ([pidfd] if pidfd is not None else [])
    ready, _, _ = select.select(watch, [], [], remaining if pidfd is not None else
                                min(remaining, 0.005))
    if sock in ready and not os.read(sock, 1):
      return None, False, True
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return status, False, False


def _children():
  me = str(os.getpid())
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open('/proc/%s/stat' % entry, 'rb') as f:
          stat = f.read().decode('ascii', 'replace')
      except OSError:
        continue
      if stat.rsplit(')', 1)[1].split()[1] == me:
        found.append(int(entry))
  return found


def _kill_all(pid):
  """Kills the worker and (as subreaper) every process it left; reaps them."""
  try:
    os.kill(pid, _SIGKILL)
  except ProcessLookupError:
    pass
  while True:
    children = _children()
    if not children:
      return
    for child in children:
      try:
        os.kill(child, _SIGKILL)
      except ProcessLookupError:
        pass
    for _ in children:
      try:
        os.waitpid(-1, 0)
      except ChildProcessError:
        break


def supervise(request, sock, record_fd, load):
  """Runs the request's program in a worker (see the module docstring); reports on `sock`."""
  _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # the worker may not read this process's memory
  if not request['namespaces']:
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us, to be killed
  scratch = _prepare(request)
  pid = _start_worker(request, sock, record_fd, scratch, load)
  status, timed_out, gone = _wait(pid, sock, request['timeout_s'])
  if request['namespaces']:  # the worker is PID 1: its end is the end of every process
    if status is None:  # timed out or the caller is gone
      os.kill(pid, _SIGKILL)
      status = os.waitpid(pid, 0)[1]
  else:
    _kill_all(pid)
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(scratch, ignore_errors=True)
  if not gone:
    os.write(sock, b'timeout' if timed_out else b'exit %d' % status)


def probe(request):
  """Checks the namespace's filesystem setup and the worker's privilege drop; prints JSON."""
  import json  # pylint: disable=g-import-not-at-top
  uid = request['uid']
  info = {'pid': os.getpid(), 'uid': uid}
  _, notes = _isolated_scratch({'uid': uid, 'disk_bytes': 1 << 20, 'disk_inodes': 64})
  info.update(notes)
  pid = os.fork()
  if not pid:
    _mount('proc', '/proc', 'proc', _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    drop_privileges(uid)
    os._exit(0 if os.getpid() == 1 and os.listdir('/proc/self/fd') else 1)
  info['worker'] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
  print(json.dumps(info))
