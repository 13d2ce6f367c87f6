"""The sandbox's supervisor: isolates the run, starts the worker, outlives the program.

Run by child.py (started by sandbox.py as `python -s [-S] child.py SOCKET_FD RECORD_FD`), under
`unshare --pid --net --mount --ipc [--user --map-root-user]` where the kernel allows it: this
process is in fresh mount, network and IPC namespaces, and the worker it forks is PID 1 of a fresh
PID namespace with its own /proc, so the program can neither see nor signal the caller or
this process, and every process it starts dies when the worker does. Stdlib only: the
package is not importable here. Steps:
  1. child.py reads the request from the caller's socket; the socket doubles as a lifeline:
     its end of file means the caller is gone, and the run is ended;
  2. namespaces: build a minimal root on a fresh tmpfs and pivot into it (_minimal_root:
     the system directories and the interpreter read-only, a synthesized /etc, a few
     devices, a size-capped scratch tmpfs on /tmp, also bound on /dev/shm and /var/tmp; no
     checkout, task files, home directories or host sockets);
     otherwise (an explicit opt-in) a scratch directory in the host's temp dir;
  3. where the caller made the run's cgroups (cgroups.py: the memory and processes of the
     whole run bounded by the kernel), wait until it says it has moved this process into them
     (one byte on the socket; without it, no worker), so that everything forked from here on
     is born inside;
  4. fork the worker: killed if this process dies, its own session, a private /proc, capped
     SysV shared memory and message queues in its own IPC namespace, no capabilities,
     no_new_privs, a uid of its own for root callers (run_uid), a seccomp filter (no new
     namespaces, no mounts, no memfd), setrlimit limits, the network blocked, then worker.py
     runs the program;
  5. wait for it, the deadline or the caller's end; kill every process of the run (with
     namespaces: the worker, PID 1; without: as subreaper, everything it left);
     report 'exit WAIT_STATUS' or 'timeout' on the socket and exit.
As PID 1 the program ignores signals it sends itself without a handler, so its CPU limit
ends it with the hard limit's SIGKILL. `child.py --probe` checks steps 2 and 4 (JSON on stdout).
"""

import ctypes
import gc
import os
import resource
import select
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRATCH = "/tmp/sandbox"
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 1, 4, 24
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_MS_NOEXEC = 8
_SIGKILL = 9
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_libc = ctypes.CDLL(None, use_errno=True)
# Denied to the program by its seccomp filter: new namespaces (a nested user namespace would
# give it mount rights: its own tmpfs outside the disk cap), entering others, any mount
# operation, and memfd (memory outside the per-process limit; a run's cgroup, where there is
# one, counts it, but without one nothing would).
# {machine: (audit arch, {syscall: number}, clone, clone3)}
_SYSCALLS = {
  "x86_64": (
    0xC000003E,
    {
      "unshare": 272,
      "setns": 308,
      "mount": 165,
      "umount2": 166,
      "pivot_root": 155,
      "chroot": 161,
      "open_tree": 428,
      "move_mount": 429,
      "fsopen": 430,
      "fsconfig": 431,
      "fsmount": 432,
      "fspick": 433,
      "mount_setattr": 442,
      "memfd_create": 319,
      "memfd_secret": 447,
    },
    56,
    435,
  ),
  "aarch64": (
    0xC00000B7,
    {
      "unshare": 97,
      "setns": 268,
      "mount": 40,
      "umount2": 39,
      "pivot_root": 41,
      "chroot": 51,
      "open_tree": 428,
      "move_mount": 429,
      "fsopen": 430,
      "fsconfig": 431,
      "fsmount": 432,
      "fspick": 433,
      "mount_setattr": 442,
      "memfd_create": 279,
      "memfd_secret": 447,
    },
    220,
    435,
  ),
}
_CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_EPERM, _ENOSYS = 1, 38


class _MountAttr(ctypes.Structure):
  _fields_ = [
    ("attr_set", ctypes.c_uint64),
    ("attr_clr", ctypes.c_uint64),
    ("propagation", ctypes.c_uint64),
    ("userns_fd", ctypes.c_uint64),
  ]


def _check(result, what):
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, "%s: %s" % (what, os.strerror(errno)))


def _mount(source, target, fstype, flags, data=None):
  _check(
    _libc.mount(
      source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()
    ),
    "mount %s" % target,
  )


def _read_only_tree(path):
  """Makes every mount at and below `path` read-only and nosuid (mount_setattr, Linux 5.12+)."""
  attr = _MountAttr(1 | 2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
  number = {"x86_64": 442, "aarch64": 442}.get(os.uname().machine)
  if number is None:
    return False
  return (
    _libc.syscall(number, -100, path.encode(), 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)) == 0
  )


_NEW_ROOT = "/tmp"  # the host's /tmp, covered in this mount namespace by the new root's tmpfs
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC = ("ld.so.cache", "ld.so.conf", "localtime", "nsswitch.conf")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_MNT_DETACH = 2


def _minimal_root(request):
  """Builds the program's whole filesystem on a fresh tmpfs and pivots into it.

  Visible, read-only: the system directories (/usr and the /bin, /lib links or folders: the
  shell and tools of the bash tool, shared libraries), the interpreter's prefix and, with
  site-packages, the virtualenv; a synthesized /etc (the loader's cache, passwd/group naming
  the program's uid, localhost); /dev null, zero, full, random, urandom. Writable: the capped
  scratch tmpfs on /tmp (also /dev/shm and /var/tmp). Nothing else of the host exists here:
  no checkout, no task or data files, no home directories, no /run, /sys, /etc secrets.
  Returns (scratch, notes)."""
  uid = request.get("uid")
  python = {sys.base_prefix}
  if request.get("site_packages"):
    venv = os.path.dirname(os.path.dirname(sys.executable))
    python |= {
      sys.prefix,
      venv if os.path.isfile(os.path.join(venv, "pyvenv.cfg")) else os.path.dirname(sys.executable),
    }
  binds, links = [], []
  for path in sorted(set(_SYSTEM) | python):
    if path in _SYSTEM and os.path.islink(path):
      links.append((path, os.readlink(path)))
    elif os.path.isdir(path) and not any(
      path.startswith(p + "/") for p in python | set(_SYSTEM) if p != path and not os.path.islink(p)
    ):
      binds.append((path, os.open(path, os.O_PATH)))  # before anything covers it
  etc = {}
  for name in _ETC:
    try:
      with open("/etc/" + name, "rb") as f:
        etc[name] = f.read(1 << 22)
    except OSError:
      pass
  own = uid if uid is not None else os.getuid()
  etc["passwd"] = (
    "root:x:0:0::/:/bin/sh\nsandbox:x:%d:%d::%s:/bin/sh\n" % (own, own, _SCRATCH)
  ).encode()
  etc["group"] = b"root:x:0:\nsandbox:x:%d:\n" % own
  etc["hosts"] = b"127.0.0.1 localhost\n::1 localhost\n"
  devices = [name for name in _DEVICES if os.path.exists("/dev/" + name)]
  new = _NEW_ROOT
  _mount("tmpfs", new, "tmpfs", _MS_NOSUID, "size=4m,nr_inodes=4096,mode=755")
  # A checkout (and its virtualenv) may live under /tmp: those are bound once the scratch
  # tmpfs covers /tmp, or it would hide them.
  under_scratch = [(p, fd) for p, fd in binds if p.startswith(_SCRATCH_DIRS)]
  for path, fd in binds:
    if (path, fd) not in under_scratch:
      _bind(fd, new + path)
  for path, target in links:
    os.symlink(target, new + path)
  os.makedirs(new + "/etc", mode=0o755)
  for name, data in etc.items():
    with open(os.path.join(new, "etc", name), "wb") as f:
      f.write(data)
  for folder in ("/dev/shm", "/proc", "/tmp", "/var/tmp"):
    os.makedirs(new + folder, mode=0o755, exist_ok=True)
  for name in devices:
    open(new + "/dev/" + name, "wb").close()
    _mount("/dev/" + name, new + "/dev/" + name, None, _MS_BIND)
  for name, target in (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
  ):
    os.symlink(target, new + "/dev/" + name)
  if _in_user_namespace():
    # There the kernel mounts a fresh proc (the worker's) only where a proc mount is already
    # visible in the namespace: the host's (without its submounts), covered by the worker's.
    _mount("/proc", new + "/proc", None, _MS_BIND)
  read_only = _read_only_tree(new)
  _mount(
    "tmpfs",
    new + "/tmp",
    "tmpfs",
    _MS_NOSUID | _MS_NODEV,
    "size=%d,nr_inodes=%d,mode=1777" % (request["disk_bytes"], request["disk_inodes"]),
  )
  for target in ("/dev/shm", "/var/tmp"):  # on the same capped tmpfs
    source = new + "/tmp/." + os.path.basename(target)
    os.mkdir(source, 0o1777)
    os.chmod(source, 0o1777)
    _mount(source, new + target, None, _MS_BIND)
  for path, fd in under_scratch:
    _bind(fd, new + path)
    read_only = _read_only_tree(new + path) and read_only
  os.chdir(new)
  _check(_libc.syscall(_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
  _check(_libc.umount2(b".", _MNT_DETACH), "detach the host root")
  os.chdir("/")
  os.mkdir(_SCRATCH, 0o700)
  return _SCRATCH, {
    "read_only": read_only,
    "minimal_root": True,
    "visible": sorted([p for p, _ in binds] + [p for p, _ in links]),
  }


def _bind(fd, target):
  """Binds the folder open as `fd` (an O_PATH descriptor) on `target`, made first."""
  os.makedirs(target, mode=0o755, exist_ok=True)
  _mount("/proc/self/fd/%d" % fd, target, None, _MS_BIND | _MS_REC)
  os.close(fd)


_SCRATCH_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def _in_user_namespace():
  with open("/proc/self/uid_map") as f:
    return f.read().split() != ["0", "0", "4294967295"]


def _prepare(request):
  if request["namespaces"]:
    scratch, _ = _minimal_root(request)
  else:
    import tempfile  # pylint: disable=g-import-not-at-top

    scratch = tempfile.mkdtemp(prefix="cwm_sandbox_%d_" % os.getpid(), dir="/tmp")
  with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
    f.write(request["source"])
  if request.get("uid") is not None:
    for path in (scratch, os.path.join(scratch, "program.py")):
      os.chown(path, request["uid"], request["uid"])
  return scratch


class _SockFilter(ctypes.Structure):
  _fields_ = [
    ("code", ctypes.c_uint16),
    ("jt", ctypes.c_uint8),
    ("jf", ctypes.c_uint8),
    ("k", ctypes.c_uint32),
  ]


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine, allow_memfd=False):
  """The classic-BPF seccomp filter of the program (see _SYSCALLS), as (code, jt, jf, k)
  tuples, or None on an architecture without a table. Another ABI (i386 or x32 calls on
  x86_64) would bypass the numbers: it is refused as a whole."""
  if machine not in _SYSCALLS:
    return None
  arch, denied, clone, clone3 = _SYSCALLS[machine]
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  allow, errno = 0x7FFF0000, 0x00050000
  prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, errno | _EPERM), (ld, 0, 0, 0)]
  if machine == "x86_64":
    prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, errno | _EPERM)]
  # clone3 passes its flags in memory, out of a filter's sight: ENOSYS makes the C library
  # fall back to clone, whose flags the filter can check.
  prog += [(jeq, 0, 1, clone3), (ret, 0, 0, errno | _ENOSYS)]
  for name, number in sorted(denied.items()):
    if allow_memfd and name == "memfd_create":
      continue
    prog += [(jeq, 0, 1, number), (ret, 0, 0, errno | _EPERM)]
  prog += [
    (jeq, 0, 3, clone),
    (ld, 0, 0, 16),
    (jset, 0, 1, _CLONE_NAMESPACES),
    (ret, 0, 0, errno | _EPERM),
    (ret, 0, 0, allow),
  ]
  return prog


def install_seccomp(allow_memfd=False):
  """Installs the filter on this process (inherited by every child); False where the
  architecture has no table or the kernel refuses (the rlimits and namespaces still hold)."""
  prog = seccomp_program(os.uname().machine, allow_memfd)
  if prog is None:
    return False
  filters = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
  fprog = _SockFprog(len(prog), filters)
  return _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def limit_ipc(shm_bytes):
  """Caps SysV shared memory and message queues of this (fresh, per-run) IPC namespace: they
  live outside any process's address space, so RLIMIT_AS does not count them."""
  page = os.sysconf("SC_PAGE_SIZE")
  # shmall bounds all segments together; msgmni the queues (each holds msgmnb, 16 KiB).
  for name, value in (("shmall", max(shm_bytes // page, 1)), ("msgmni", 16)):
    with open("/proc/sys/kernel/" + name, "w") as f:
      f.write(str(value))


def drop_privileges(uid, seccomp=True):
  """No capabilities (bounding set too), uid `uid` if given, no_new_privs, then the seccomp
  filter (no new namespaces, no mounts, no memfd): for the worker."""
  for cap in range(64):
    if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
      break  # EINVAL: past the last capability; EPERM: not privileged, nothing to drop
  if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)
  _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
  _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
  _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
  return install_seccomp() if seccomp else False


def apply_limits(spec, processes=None):
  """Applies 'AS,CPU,FSIZE' resource limits (bytes, seconds, bytes) to this process, and
  RLIMIT_NPROC (processes of its uid) when given."""
  memory, cpu, fsize = (int(v) for v in spec.split(","))
  resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  if processes:
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _start_worker(request, sock, record_fd, scratch, load):
  worker = load("worker")
  gc.freeze()  # the worker's collections then leave the pages it shares with us alone
  pid = os.fork()
  if pid:
    os.close(record_fd)
    return pid
  try:
    os.close(sock)
    _libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)  # ends with this process, whatever happens
    os.setsid()  # kill(0, ...) by the program reaches its own processes only
    if request["namespaces"]:  # PID 1 of the new PID namespace: its own /proc
      _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
      limit_ipc(request["disk_bytes"])
    drop_privileges(request.get("uid"))
    os.chdir(scratch)
    os.environ.update(HOME=scratch, TMPDIR=scratch)
    # Processes are counted per uid: only the dropped uid or a fresh user namespace is ours.
    own_uid = request["namespaces"] or request.get("uid") is not None
    apply_limits(request["limits"], request["max_processes"] if own_uid else None)
    worker.main(request, record_fd, load)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)
  except MemoryError:
    print("MemoryError", file=sys.stderr)  # the caller's 'memory' status
    os._exit(1)
  except BaseException as e:  # the worker's own failure: say so, never fall back into this
    print("sandbox worker failed: %r" % e, file=sys.stderr)
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
    ready, _, _ = select.select(
      watch, [], [], remaining if pidfd is not None else min(remaining, 0.005)
    )
    if sock in ready and not os.read(sock, 1):
      return None, False, True
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return status, False, False


def _children():
  me = str(os.getpid())
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open("/proc/%s/stat" % entry, "rb") as f:
          stat = f.read().decode("ascii", "replace")
      except OSError:
        continue
      if stat.rsplit(")", 1)[1].split()[1] == me:
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


def run_uid(base):
  """The program's uid for a root caller: `base` + this supervisor's pid, unique among the
  runs alive on the host, so that RLIMIT_NPROC (counted per uid) and kill() never couple two
  concurrent runs, and no file on the host belongs to it."""
  return None if base is None else base + os.getpid()


def _remove_scratch(request, scratch):
  """Without namespaces the scratch is a host folder (with them it ends with the namespace)."""
  if not request["namespaces"]:
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.rmtree(scratch, ignore_errors=True)


def supervise(request, sock, record_fd, load):
  """Runs the request's program in a worker (see the module docstring); reports on `sock`."""
  _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # the worker may not read this process's memory
  request["uid"] = run_uid(request.get("uid"))
  if not request["namespaces"]:
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us, to be killed
  scratch = _prepare(request)
  # Where the caller made the run's cgroups it moves this process into them meanwhile, then
  # says so: the worker (and every process of the program) must be born inside.
  if request.get("cgroup") and os.read(sock, 1) != b"1":
    _remove_scratch(request, scratch)  # the move failed or the caller is gone: no worker
    return
  pid = _start_worker(request, sock, record_fd, scratch, load)
  status, timed_out, gone = _wait(pid, sock, request["timeout_s"])
  if request["namespaces"]:  # the worker is PID 1: its end is the end of every process
    if status is None:  # timed out or the caller is gone
      os.kill(pid, _SIGKILL)
      status = os.waitpid(pid, 0)[1]
  else:
    _kill_all(pid)
    _remove_scratch(request, scratch)
  if not gone:
    os.write(sock, b"timeout" if timed_out else b"exit %d" % status)


def probe(request):
  """Checks the namespace's filesystem setup and the worker's privilege drop; prints JSON."""
  import json  # pylint: disable=g-import-not-at-top

  uid = request["uid"]
  info = {"pid": os.getpid(), "uid": uid}
  _, notes = _minimal_root({"uid": run_uid(uid), "disk_bytes": 1 << 20, "disk_inodes": 64})
  info.update(notes)
  pid = os.fork()
  if not pid:
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    limit_ipc(1 << 20)
    filtered = drop_privileges(run_uid(uid))
    ok = os.getpid() == 1 and os.listdir("/proc/self/fd")
    os._exit((0 if ok else 1) | (0 if filtered else 2))
  code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
  info["worker"] = code in (0, 2)
  info["seccomp"] = code == 0
  print(json.dumps(info))
