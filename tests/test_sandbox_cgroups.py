"""Per-run cgroups (cgroups.py): the kernel bounds the memory and processes of a whole run.

The attacks of issue #45 that per-process limits let through: forked children that add up past
`memory_mb`, memfds, writes into the scratch tmpfs, and one run's fork bomb next to an honest
run. They run on this host's real hierarchy (v2 where delegated, else v1); where the kernel
offers neither to this process they are skipped with the reason `cgroups.detect()` gives.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cwm_jax.data import traces
from cwm_jax.data.traces import cgroups, isolation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIERARCHY = cgroups.resolve("auto")
needs_cgroup = pytest.mark.skipif(
  HIERARCHY is None, reason=f"no cgroup hierarchy for this process: {cgroups.detect()}"
)
needs_namespaces = pytest.mark.skipif(
  not isolation.probe().namespaces, reason="this kernel allows no namespaces"
)


@pytest.fixture(autouse=True)
def _no_cgroup_left_behind():
  yield
  # A run's cgroup is removed at its end, or, while its supervisor's namespaces are still being
  # torn down, by the next run's start or `settle` (also at exit): none is left after that.
  assert cgroups.settle() == [] and cgroups.existing() == [], "a run's cgroup outlived the run"


# Each child holds 60 MB until every child has it or died, so the total is reached at once
# whatever the scheduling; prints (children that got it, children that died).
_CHILDREN = textwrap.dedent("""
    import os, select
    N = {n}
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    for _ in range(N):
        if os.fork() == 0:
            block = bytearray(60 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os.write(ready_w, b'.')
            os.read(go_r, 1)
            os._exit(0)
    ready = dead = 0
    while ready + dead < N:
        if select.select([ready_r], [], [], 0.05)[0]:
            ready += len(os.read(ready_r, N))
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            dead += 1
    os.close(go_w)
    print(ready, dead)
""")


@needs_cgroup
@needs_namespaces
def test_forked_children_share_one_memory_bound():
  honest = traces.run_python(_CHILDREN.format(n=2), limits=traces.Limits(memory_mb=256))
  assert honest.status == "ok" and honest.stdout.split() == ["2", "0"], honest
  attack = traces.run_python(_CHILDREN.format(n=6), limits=traces.Limits(memory_mb=256))
  assert attack.status == "memory", attack  # 360 MB in all: per process each fits


_MEMFDS = textwrap.dedent("""
    import os
    held = []
    try:
        for _ in range(8):
            fd = os.memfd_create('m')
            for _ in range(60):
                os.write(fd, b'x' * (1 << 20))
            held.append(fd)
    except OSError as e:
        print('refused', e.errno)
    print('held', len(held))
""")


@needs_namespaces
def test_memfds_cannot_hold_memory_past_the_limit():
  """The sandbox's seccomp filter refuses memfd_create (EPERM) with or without a cgroup."""
  result = traces.run_python(_MEMFDS, limits=traces.Limits(memory_mb=128))
  assert result.status == "memory" or "held 0" in result.stdout, result
  assert result.status == "memory" or "refused 1" in result.stdout, result


def _in_cgroup(group, code):
  """Runs `code` in a plain interpreter moved into `group` before it runs it (as the sandbox
  moves its supervisor before sending the request): the cgroup alone, without the sandbox's
  seccomp filter or rlimits."""
  proc = subprocess.Popen(
    [sys.executable, "-S", "-c", "import os, sys\nsys.stdin.readline()\n" + textwrap.dedent(code)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert group.add(proc.pid)
  proc.stdin.write("go\n")
  proc.stdin.flush()
  return proc


@needs_cgroup
def test_the_cgroup_alone_counts_memfds():
  """Defence in depth behind the seccomp filter: memfd pages are the run's memory."""
  for count, killed in ((1, False), (8, True)):
    group = cgroups.create("auto", 128 << 20, 64)
    try:
      proc = _in_cgroup(group, _MEMFDS.replace("range(8)", f"range({count})"))
      out, err = proc.communicate(timeout=300)
    finally:
      oom = group.finish()
    if killed:  # 480 MB of memfds against 128 MB
      assert proc.returncode == -9 and oom, (proc.returncode, out, err)
    else:
      assert proc.returncode == 0 and out == "held 1\n" and not oom, (out, err)


_SCRATCH_WRITES = textwrap.dedent("""
    total = 0
    try:
        for i in range(8):  # files of 30 MB: each below the file size limit
            with open(f'f{i}', 'wb') as f:
                for _ in range(30):
                    f.write(b'x' * (1 << 20))
                    total += 1 << 20
    except OSError as e:
        print('OSError', e.errno)
    print(total >> 20)
""")


@needs_cgroup
@needs_namespaces
def test_scratch_tmpfs_writes_count_as_memory():
  """240 MB into the scratch tmpfs: with a disk budget above it, the run's memory limit stops
  it (the pages are the run's memory); with the default budget, the tmpfs's size does."""
  big_disk = traces.Limits(memory_mb=128, disk_bytes=512 << 20)
  result = traces.run_python(_SCRATCH_WRITES, limits=big_disk)
  assert result.status == "memory", result
  honest = traces.run_python(_SCRATCH_WRITES.replace("range(8)", "range(2)"), limits=big_disk)
  assert honest.status == "ok" and honest.stdout == "60\n", honest
  small_disk = traces.run_python(
    _SCRATCH_WRITES, limits=traces.Limits(memory_mb=128, disk_bytes=64 << 20)
  )
  assert small_disk.status == "ok" and "OSError 28" in small_disk.stdout, small_disk  # ENOSPC


_FORK_BOMB = textwrap.dedent("""
    import os, time
    while True:
        try:
            os.fork()  # parent and child both go on forking, until the run's count is reached
        except OSError:
            time.sleep(600)
""")


def _pids_folder(limit):
  """The pids cgroup of one of this process's runs that holds `limit` tasks, or None."""
  for folder in cgroups.existing():
    try:
      with open(os.path.join(folder, "pids.current")) as f:
        if int(f.read()) >= limit:
          return folder
    except OSError:
      continue
  return None


@needs_cgroup
@needs_namespaces
def test_a_fork_bomb_in_one_run_leaves_a_concurrent_run_alone():
  results = {}
  limits = traces.Limits(max_processes=16, timeout_s=600)
  thread = threading.Thread(
    target=lambda: results.update(bomb=traces.run_python(_FORK_BOMB, limits=limits))
  )
  thread.start()
  deadline = time.monotonic() + 120  # a fail-safe: the bomb is normally full at once
  full = 16 + 1  # the run's processes and its supervisor
  while time.monotonic() < deadline and _pids_folder(full) is None:
    time.sleep(0.05)
  bomb = _pids_folder(full)
  honest = traces.run_python(
    "import subprocess\nfor _ in range(5):\n    subprocess.run(['true'], check=True)\nprint('ok')\n",
    limits=traces.Limits(max_processes=16),
  )
  with open(os.path.join(bomb, "pids.current")) as f:
    held = int(f.read())
  for line in open(os.path.join(bomb, "cgroup.procs")).read().split():
    try:
      os.kill(int(line), 9)
    except ProcessLookupError:
      pass
  thread.join()
  assert honest.status == "ok" and honest.stdout == "ok\n", honest
  assert held == full and results["bomb"].status != "ok", (held, results)


@needs_cgroup
def test_the_pids_cgroup_alone_bounds_a_run():
  """Processes of the same uid (here root, which RLIMIT_NPROC does not bind) in two runs'
  cgroups: one run holding all of its pids.max leaves the other's forks alone."""
  hog = cgroups.create("auto", 256 << 20, 10)
  other = cgroups.create("auto", 256 << 20, 10)
  try:
    proc = _in_cgroup(
      hog,
      """
      import sys, time
      started = 0
      for _ in range(50):
          try:
              if os.fork() == 0:
                  time.sleep(600)
                  os._exit(0)
              started += 1
          except OSError:
              break
      print(started, flush=True)
      sys.stdin.read()
      """,
    )
    started = int(proc.stdout.readline())
    honest = _in_cgroup(
      other,
      """
      import subprocess
      for _ in range(5):
          subprocess.run(['true'], check=True)
      print('ok')
      """,
    )
    out, err = honest.communicate(timeout=300)
  finally:
    hog.finish()
    other.finish()
  proc.communicate(timeout=300)
  assert started == 9, started  # the interpreter itself is the tenth
  assert honest.returncode == 0 and out == "ok\n", err


@needs_cgroup
@needs_namespaces
def test_no_cgroup_is_left_after_any_ending():
  endings = {
    "ok": ("print(1)", {}),
    "error": ("1 / 0", {}),
    "timeout": ("while True:\n    pass", {"timeout_s": 1.0}),
    "memory": (_CHILDREN.format(n=6), {"memory_mb": 256}),
    "output_limit": ("print('x' * 10**6)", {"output_bytes": 1000}),
  }
  for status, (program, limits) in endings.items():
    result = traces.run_python(program, limits=traces.Limits(**limits))
    assert result.status == status, result
    assert cgroups.settle() == [] and cgroups.existing() == [], status


@needs_cgroup
@needs_namespaces
def test_a_killed_callers_cgroups_are_swept_by_the_next_caller():
  program = "import time\nprint('started', flush=True)\ntime.sleep(600)\n"
  caller = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "from cwm_jax.data import traces\n"
      f"traces.run_python({program!r}, limits=traces.Limits(timeout_s=600))\n",
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  try:
    deadline = time.monotonic() + 120  # a fail-safe: the run's cgroup normally appears at once
    while time.monotonic() < deadline and not _populated(cgroups.existing(caller.pid)):
      time.sleep(0.05)
    left = cgroups.existing(caller.pid)
    assert _populated(left), left
  finally:
    caller.kill()
    caller.wait()
  deadline = time.monotonic() + 120  # its supervisor kills the run once the caller's socket closes
  while time.monotonic() < deadline and _populated(left):
    time.sleep(0.05)
  next_caller = subprocess.run(
    [sys.executable, "-c", "from cwm_jax.data.traces import cgroups\ncgroups.resolve('auto')"],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert next_caller.returncode == 0, next_caller.stderr
  assert not any(os.path.exists(folder) for folder in left)


def _populated(folders):
  for folder in folders:
    try:
      with open(os.path.join(folder, "cgroup.procs")) as f:
        if f.read().strip():
          return True
    except FileNotFoundError:
      pass
  return False


def test_modes_are_checked_and_a_missing_hierarchy_is_refused():
  with pytest.raises(ValueError, match="cgroup"):
    traces.Limits(cgroup="v3")
  assert cgroups.resolve("off") is None
  offered = cgroups.detect()
  for mode in ("v2", "v1"):
    if isinstance(offered[mode], str):  # not offered here: a clear refusal, before any run
      with pytest.raises(cgroups.CgroupUnavailable, match=mode):
        traces.run_python("print(1)", limits=traces.Limits(cgroup=mode))
      with pytest.raises(cgroups.CgroupUnavailable, match="does not offer"):
        cgroups.resolve(mode)


_CGROUP = "12:pids:/a/b\n4:memory:/process_api/x\n2:cpu,cpuacct:/\n0::/user.slice/s.scope\n"
_MOUNTINFO = (
  "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
  "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
  "32 25 0:28 /a /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
  "33 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
  "34 25 0:30 /other /mnt/odd\\040dir rw - cgroup2 cgroup2 rw\n"
  "35 25 8:1 / / rw - ext4 /dev/sda1 rw\n"
)


def test_each_hierarchys_folder_is_found_from_proc():
  own = cgroups.own_cgroups(_CGROUP)
  assert own == {
    "pids": "/a/b",
    "memory": "/process_api/x",
    "cpu": "/",
    "cpuacct": "/",
    "": "/user.slice/s.scope",
  }
  mounts = cgroups.cgroup_mounts(_MOUNTINFO)
  assert [m[0] for m in mounts] == [
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu,cpuacct",
    "/mnt/odd dir",
  ]
  assert (
    cgroups.folder_of(own[""], mounts, "cgroup2") == "/sys/fs/cgroup/unified/user.slice/s.scope"
  )
  assert cgroups.folder_of(own["memory"], mounts, "cgroup", "memory") == (
    "/sys/fs/cgroup/memory/process_api/x"
  )
  # a mount of a sub-tree (a container's view): paths are relative to its root
  assert cgroups.folder_of(own["pids"], mounts, "cgroup", "pids") == "/sys/fs/cgroup/pids/b"
  assert cgroups.folder_of("/elsewhere", mounts[2:3], "cgroup", "pids") is None
  assert cgroups.folder_of("/other/x", mounts[4:], "cgroup2") == "/mnt/odd dir/x"
  assert cgroups.folder_of("/x", mounts, "cgroup", "blkio") is None


_V2_FILES = {
  "cgroup.procs": "",
  "cgroup.controllers": "cpu memory pids",
  "cgroup.subtree_control": "",
  "memory.max": "",  # written by the caller (the fake keeps no default to overwrite)
  "memory.swap.max": "",
  "memory.oom.group": "",
  "pids.max": "",
  "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
}


def _fake_cgroup(folder):
  os.mkdir(folder)
  for name, text in _V2_FILES.items():
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)


def test_v2_steps_on_a_delegated_cgroup(tmp_path, monkeypatch):
  """The v2 set-up, on a fake cgroup2 tree (the files a delegated cgroup has; the kernel's
  side is not simulated): the caller moves itself into a leaf, enables memory and pids for its
  cgroup's children, and a run's leaf gets its limits. A cgroup shared with other processes
  is refused with the reason, and this process moved back."""
  monkeypatch.setattr(cgroups, "_mkdir", _fake_cgroup)
  mounts = cgroups.cgroup_mounts(f"30 25 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
  own = tmp_path / "svc"
  _fake_cgroup(own)
  found = cgroups.v2_parent({"": "/svc"}, mounts)
  assert found == cgroups.Hierarchy(2, (str(own),)), found
  leaf = own / f"cwm-sandbox-{cgroups._identity()}-caller"
  assert (leaf / "cgroup.procs").read_text() == str(os.getpid())
  assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
  run = cgroups.RunCgroup(found, 128 << 20, 32)
  limits = {n: (own / run.dirs[0] / n).read_text() for n in list(_V2_FILES)[3:7]}
  assert limits == {
    "memory.max": str(128 << 20),
    "memory.swap.max": "0",
    "memory.oom.group": "1",
    "pids.max": "32",
  }
  assert cgroups._oom_kills(run.dirs[0], 2) == 0
  # a process the caller started (in its leaf) makes its runs beside the caller's
  assert cgroups.v2_parent({"": f"/svc/{leaf.name}"}, mounts) == found

  shared = tmp_path / "shared"
  _fake_cgroup(shared)
  os.remove(shared / "cgroup.subtree_control")
  os.mkdir(shared / "cgroup.subtree_control")  # refuses writes, as EBUSY would
  reason = cgroups.v2_parent({"": "/shared"}, mounts)
  assert isinstance(reason, str) and "other processes share" in reason, reason
  assert (shared / "cgroup.procs").read_text() == str(os.getpid())  # moved back
  for controllers, why in (("cpu io", "not memory and pids"), ("", "none")):
    (shared / "cgroup.controllers").write_text(controllers)
    assert why in cgroups.v2_parent({"": "/shared"}, mounts)
  assert "no cgroup v2 path" in cgroups.v2_parent({"memory": "/"}, mounts)
