"""What isolation this machine allows the sandbox, detected once per process.

`probe()` tries `unshare --pid --net --mount --ipc` (plus `--user --map-root-user` for a caller
that is not root) around `child.py --probe`, which builds the run's filesystem and forks a
worker that mounts its /proc as PID 1 and drops its privileges (seccomp filter included).
When that works, every run gets fresh PID, mount, network and IPC namespaces; a root
caller's program also runs as a uid of its own (UID_BASE + the supervisor's pid). When it
does not, running untrusted code is refused (`SandboxRefused`) unless the caller opts in with
`Limits(allow_no_isolation=True)`: the program then runs with resource limits, the seccomp
filter, the in-process network block and, for root callers, the uid drop, but can reach the
network through what Python cannot intercept (ctypes, a child interpreter), and signal its
caller if uids match. A root caller whose interpreter an unprivileged uid cannot read (e.g.
under a 0700 /root) is refused even then: the program never runs as uid 0.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import marshal
import os
import shutil
import subprocess
import sys

from cwm_jax.base import ConfigError
from cwm_jax.data.traces import cgroups

_HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(_HERE, "child.py")
# Stdlib-only, run in the child (channel.py, the records' reading end, stays in the caller).
CHILD_MODULES = ("supervisor", "worker", "channel_writer", "tracer")
# A root caller's program runs as UID_BASE + its supervisor's pid (supervisor.run_uid): a uid
# of its own, which no host file or other run has.
UID_BASE = 2_000_000_000
# No --fork: the supervisor stays outside the new PID namespace; its worker becomes PID 1.
_NAMESPACE_FLAGS = ("--pid", "--net", "--mount", "--ipc")


class SandboxRefused(ConfigError):
  """Untrusted code cannot be isolated from the network here, and the caller did not opt in."""


@dataclasses.dataclass(frozen=True)
class Isolation:
  """What a sandboxed run gets on this machine."""

  namespaces: bool  # fresh PID, mount and network namespaces, read-only mounts, capped tmpfs
  prefix: tuple[str, ...]  # the `unshare` command line that creates them; () without
  uid: int | None  # the uid the program runs as (root callers), None: the caller's own
  reason: str = ""  # why there are no namespaces
  details: dict = dataclasses.field(default_factory=dict)  # what the probe saw

  def describe(self) -> dict:
    return {
      "namespaces": self.namespaces,
      "unshare": " ".join(self.prefix) or None,
      "program_uid": "per run" if self.uid is not None else os.geteuid(),
      "user_namespace": "--user" in self.prefix,
      "network_isolated": self.namespaces,
      "reason": self.reason,
      **self.details,
      "cgroup": cgroups.detect(),
    }


@functools.cache
def child_modules() -> dict:
  """{name: code} of CHILD_MODULES, compiled once per process and shipped with each request."""
  out = {}
  for name in CHILD_MODULES:
    path = os.path.join(_HERE, name + ".py")
    with open(path, encoding="utf-8") as f:
      out[name] = compile(f.read(), path, "exec", dont_inherit=True)
  return out


def _unshare_prefix() -> tuple[str, ...] | None:
  unshare = shutil.which("unshare")
  if not unshare:
    return None
  user = () if os.geteuid() == 0 else ("--user", "--map-root-user")
  return (unshare, *user, *_NAMESPACE_FLAGS)


@functools.cache
def probe() -> Isolation:
  """Detects (once) whether namespaces work here; see the module docstring."""
  uid = UID_BASE if os.geteuid() == 0 else None
  prefix = _unshare_prefix()
  if prefix is None:
    return Isolation(False, (), uid, "no `unshare` executable on PATH (util-linux)")
  try:
    request = marshal.dumps({"uid": uid, "modules": child_modules()})
    done = subprocess.run(
      [*prefix, sys.executable, "-s", "-S", CHILD, "--probe"],
      input=len(request).to_bytes(4, "big") + request,
      capture_output=True,
      timeout=60,
      cwd="/",
    )
  except (OSError, subprocess.SubprocessError) as e:
    return Isolation(False, (), uid, f"`unshare` failed: {e}")
  if done.returncode != 0:
    return Isolation(
      False,
      (),
      uid,
      f"`{' '.join(prefix)}` failed: "
      f"{done.stderr.decode(errors='replace').strip()[-300:] or done.returncode}",
    )
  details = json.loads(done.stdout.decode().strip().splitlines()[-1])
  if not details.pop("worker", False):
    return Isolation(False, (), uid, "the worker could not drop its privileges")
  details.pop("pid", None)
  details.pop("uid", None)
  return Isolation(True, prefix, uid, "", details)


def check(namespaces: bool, allow_no_isolation: bool) -> Isolation:
  """The isolation of the next run; SandboxRefused if there is none and no opt-in."""
  iso = (
    probe()
    if namespaces
    else dataclasses.replace(
      probe(), namespaces=False, prefix=(), reason="namespaces turned off (Limits.namespaces)"
    )
  )
  if not iso.namespaces and not allow_no_isolation:
    raise SandboxRefused(
      f"refusing to run untrusted code without network isolation: {iso.reason}. Run where "
      "`unshare --pid --net --mount` works (as root, or with "
      "unprivileged user namespaces), or opt in with Limits(allow_no_isolation=True) / "
      "--allow_no_isolation to run it with in-process network blocking only."
    )
  if not iso.namespaces and fallback_refusal():
    raise SandboxRefused(f"{fallback_refusal()} ({iso.reason})")
  return iso


def fallback_refusal() -> str:
  """Why a run without namespaces is refused outright on this machine, or ''. A root caller's
  program must drop to an unprivileged uid, which must be able to read the interpreter."""
  if os.geteuid() != 0 or _traversable(sys.base_prefix):
    return ""
  return (
    "refusing to run untrusted code as root: without namespaces the program must run "
    "as an unprivileged uid, which cannot read the interpreter under "
    f"{sys.base_prefix} (a private folder above it); install Python where every user "
    "can read it, or run where namespaces work"
  )


def _traversable(path: str) -> bool:
  """Whether every directory above `path` lets other users through (o+x)."""
  parts = os.path.abspath(path).split(os.sep)[1:]
  return all(os.stat(os.sep + os.sep.join(parts[:i])).st_mode & 0o001 for i in range(1, len(parts)))


def sweep_stale_scratch() -> int:
  """Removes scratch directories of runs without namespaces whose supervisor is gone."""
  removed = 0
  for path in glob.glob(os.path.join("/tmp", "cwm_sandbox_*_*")):
    pid = os.path.basename(path).split("_")[2]
    if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
      shutil.rmtree(path, ignore_errors=True)
      removed += 1
  return removed
