"""Repository traces: run a Python project's tests under the tracer, one trace per call from the
tests into the project's own functions.

A work item is one test module of a project whose dependencies are installed. It runs as one
sandboxed pytest session (`traces/repo_child.py` through `sandbox.run_python`, with site-packages
so pytest and the dependencies import) under per-test limits: a wall-clock limit per test
(setup, call and teardown), at most `max_traces_per_test` traced calls per test, and the trace
limits of `traces.Limits` (10k line events, 1 MB) per call, and at most
`max_traces_per_function` traces of one function per module; the session as a whole has
`module_timeout_s`. Entry = the project function called by test code (CWM's choice); what it calls
in the same file is part of its trace, as in `trace_call`.

The shipped example source is the CPython standard library's own test suite (`stdlib_test_items`):
project = the stdlib folder minus unittest/test/GUI packages, tests = Lib/test/test_NAME.py.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import os
import sys
import sysconfig

from absl import logging

from cwm_jax import storage
from cwm_jax.data import traces
from cwm_jax.data.sources_functions import Candidate
from cwm_jax.data.traces import sandbox

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")
CHILD = os.path.join(_HERE, "repo_child.py")
TRACER = os.path.join(_HERE, "tracer.py")
# Small, fast stdlib test modules whose pure-Python code is exercised by their tests.
STDLIB_EXAMPLE = (
  "test_bisect",
  "test_colorsys",
  "test_textwrap",
  "test_fnmatch",
  "test_shlex",
  "test_string",
)
STDLIB_EXCLUDE = (
  "unittest/*",
  "test/*",
  "idlelib/*",
  "tkinter/*",
  "lib2to3/*",
  "turtledemo/*",
  "doctest.py",
  "pdb.py",
  "bdb.py",
  "trace.py",
  "cProfile.py",
  "profile.py",
)


@dataclasses.dataclass(frozen=True)
class RepoLimits:
  """Per-test and per-session limits of repository tracing."""

  per_test_timeout_s: float = 20.0
  max_traces_per_test: int = 64
  max_traces_per_function: int = 32  # per test module: keeps one hot helper from dominating
  module_timeout_s: float = 300.0
  memory_mb: int = 4096
  output_bytes: int = 256 << 20  # everything the session reports (traces included)
  max_project_bytes: int = 64 << 20  # a project outside the interpreter's folders is copied

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) <= 0:
        raise ValueError(
          f"RepoLimits.{field.name} must be positive, got {getattr(self, field.name)!r}"
        )


@dataclasses.dataclass(frozen=True)
class TestModuleItem:
  """A work item: one test module of the project at `root`."""

  root: str
  path: str
  exclude: tuple[str, ...] = ()


def stdlib_test_items(names=STDLIB_EXAMPLE) -> list[TestModuleItem]:
  """Test modules of the standard library's own suite; names=None: the whole suite."""
  root = sysconfig.get_paths()["stdlib"]
  test_dir = os.path.join(root, "test")
  if not os.path.isfile(os.path.join(test_dir, "test_bisect.py")):
    raise ValueError(
      f"this Python has no standard-library test suite in {test_dir} (some "
      "distributions strip Lib/test; install it, e.g. the python3-test package) "
      "-- or trace another project with --repo DIR"
    )
  if names is None:
    names = sorted(
      n[:-3] for n in os.listdir(test_dir) if n.startswith("test_") and n.endswith(".py")
    )
  items = []
  for name in names:
    path = os.path.join(test_dir, name + ".py")
    if not os.path.isfile(path):
      raise ValueError(
        f"no standard-library test module {name!r} ({path}); names look like "
        + ", ".join(STDLIB_EXAMPLE)
      )
    items.append(TestModuleItem(root, path, STDLIB_EXCLUDE))
  return items


def repo_test_items(root: str, exclude=()) -> list[TestModuleItem]:
  """Every test_*.py / *_test.py file under `root` (hidden, virtualenv and site dirs skipped)."""
  if storage.is_url(root):  # its tests run in the sandbox, from files on this machine
    raise ValueError(f"--repo {root}: a repository to trace must be a local checkout, not a URL")
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise ValueError(f"--repo {root}: not a directory; give the root of a Python project")
  items = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(
      d
      for d in dirs
      if not d.startswith(".")
      and d not in ("site-packages", "node_modules", "venv", "build", "dist", "__pycache__")
    )
    for name in sorted(names):
      if name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py")):
        items.append(TestModuleItem(root, os.path.join(folder, name), tuple(exclude)))
  if not items:
    raise ValueError(f"--repo {root}: no test_*.py or *_test.py files found")
  return items


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


_SKIP_DIRS = (
  ".git",
  ".hg",
  ".venv",
  "venv",
  "__pycache__",
  "node_modules",
  "build",
  "dist",
  "site-packages",
  ".tox",
  ".mypy_cache",
  ".pytest_cache",
)


def project_files(root: str, max_bytes: int) -> dict[str, str]:
  """{relative path: base64 content} of a project, to recreate it inside the sandbox (whose
  filesystem need not show the caller's folders)."""
  files, total = {}, 0
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    for name in sorted(names):
      path = os.path.join(folder, name)
      size = os.path.getsize(path)
      total += size
      if total > max_bytes:
        raise ValueError(
          f"{root}: the project is larger than {max_bytes} bytes; trace a "
          "smaller folder or raise RepoLimits.max_project_bytes"
        )
      with open(path, "rb") as f:
        files[os.path.relpath(path, root)] = base64.b64encode(f.read()).decode("ascii")
  return files


def _shipped(root: str) -> bool:
  """Projects outside the interpreter's folders are copied into the sandbox."""
  real = os.path.realpath(root)
  return not any(
    real == p or real.startswith(p + os.sep)
    for p in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
  )


def _request(item: TestModuleItem, limits: RepoLimits, trace_limits: traces.Limits) -> dict:
  files = project_files(item.root, limits.max_project_bytes) if _shipped(item.root) else None
  return {
    "root": item.root,
    "tests": [item.path],
    "exclude": list(item.exclude),
    "files": files,
    "tracer": _read(TRACER),
    "per_test_timeout_s": limits.per_test_timeout_s,
    "max_traces_per_test": limits.max_traces_per_test,
    "max_traces_per_function": limits.max_traces_per_function,
    "max_events": trace_limits.max_events,
    "max_bytes": trace_limits.max_trace_bytes,
    "max_value_chars": trace_limits.max_value_chars,
  }


def trace_test_module(
  item: TestModuleItem,
  limits: RepoLimits = RepoLimits(),
  trace_limits: traces.Limits = traces.Limits(),
) -> tuple[list[Candidate], collections.Counter]:
  """Runs one test module under the tracer; returns its candidate traces and counters
  (tests by outcome, calls not traced by reason, and `session_STATUS` if the session failed)."""
  request = _request(item, limits, trace_limits)
  box = sandbox.Limits(
    timeout_s=limits.module_timeout_s,
    memory_mb=limits.memory_mb,
    output_bytes=limits.output_bytes,
    site_packages=True,
  )
  run = sandbox.run_python(_read(CHILD), stdin=json.dumps(request), limits=box)
  sources, candidates, counts = {}, [], collections.Counter()
  origin = os.path.relpath(item.path, item.root)
  done = False
  for line in run.stdout.splitlines():
    try:
      message = json.loads(line)
    except json.JSONDecodeError:
      break  # the session was cut while writing
    kind = message["kind"]
    if kind == "source":
      sources[message["file"]] = message["text"]
    elif kind == "trace":
      candidates.append(
        Candidate(
          message["status"],
          sources[message["file"]],
          message["function"],
          message["frames"],
          f"{message['rel']}:{message['function']} <- {message['test']}",
          message["message"],
        )
      )
    elif kind == "skip":
      counts[message["reason"]] += 1
    elif kind == "test":
      counts["tests_" + message["outcome"]] += 1
    elif kind == "done":
      done = True
  if not done:  # the traces it reported before it stopped are kept
    counts["session_" + (run.status if run.status != "ok" else "error")] += 1
    logging.warning(
      "pytest session of %s did not finish (%s): %s", origin, run.status, run.stderr.strip()[-1000:]
    )
  return candidates, counts
