"""Repository tracing, child side: run pytest on test modules and trace every call from the tests
into the project's own functions.

Runs inside the sandbox as the program of `sandbox.run_python` (with `site_packages=True`, so that
pytest and the project's dependencies import); the parent is `cwm_jax.data.repo_traces`. It reads a
JSON request on stdin:
  root        the project directory (added to sys.path)
  tests       test files to run (absolute paths)
  files       None, or {relative path: base64 content}: the project is recreated under the
              working directory (the sandbox's scratch) and `root`/`tests` are mapped into it
  exclude     fnmatch patterns of paths under root that are not project code (e.g. 'unittest/*')
  tracer      the text of cwm_jax/data/traces/tracer.py (run as a module here)
  per_test_timeout_s, max_traces_per_test, max_traces_per_function (whole session),
  max_events, max_bytes, max_value_chars
and writes JSON lines on stdout (pytest's own output goes to stderr):
  {"kind": "source", "file", "text"}               once per project file, before its first trace
  {"kind": "trace", "file", "rel", "function", "test", "status", "frames", "message"}
  {"kind": "skip", "reason", "test", "function"}   a call that was not traced ('unsupported',
                                                   'capped' by a per-test/per-function limit)
  {"kind": "test", "test", "outcome"}              one per test ('passed', 'failed', 'timeout')
  {"kind": "done", "exit_code"}
An entry is a call whose caller is code of a test file (test_*.py, *_test.py or one of `tests`)
and whose callee is a plain function or method (qualified name without '<') of a project file
under `root`; everything the entry calls in the same file is recorded with it, as in
`trace_call`. Generators and nested functions are 'unsupported' entries.
"""

import base64
import fnmatch
import inspect
import json
import os
import signal
import sys
import tokenize
import types

import pytest

_UNTRACEABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
DEFAULT_EXCLUDE = (
  "*site-packages/*",
  "*dist-packages/*",
  "test/*",
  "tests/*",
  "*/test/*",
  "*/tests/*",
  "testing/*",
  "conftest.py",
  "*/conftest.py",
  "setup.py",
  "docs/*",
)


class TestTimeout(Exception):
  """The test ran past its per-test limit."""


class _Entry:
  def __init__(self, recorder, frame, function, test):
    self.recorder, self.frame, self.function, self.test = recorder, frame, function, test
    self.frames = {frame}
    self.dead = None  # (status, message) once the recording was abandoned


class RepoTracer:
  """sys.settrace dispatcher: finds entries and feeds their frames to a tracer.Recorder."""

  def __init__(self, request, tracer, emit):
    self.root = os.path.realpath(request["root"])
    self.tests = {os.path.realpath(t) for t in request["tests"]}
    self.exclude = tuple(request.get("exclude") or ()) + DEFAULT_EXCLUDE
    self.limits = request
    self.tracer, self.emit = tracer, emit
    self.entry, self.test, self.per_test = None, "", 0
    self._files, self._codes, self._sources = {}, {}, {}
    self._per_function = {}

  # Classification, cached per file name and per code object.
  def _file_kind(self, filename):
    kind = self._files.get(filename)
    if kind is None:
      path = os.path.realpath(filename)
      name = os.path.basename(path)
      rel = os.path.relpath(path, self.root)
      if path in self.tests or (name.startswith("test_") or name.endswith("_test.py")):
        kind = "test"
      elif (
        not path.endswith(".py")
        or rel.startswith("..")
        or any(fnmatch.fnmatch(rel, p) for p in self.exclude)
      ):
        kind = "other"
      else:
        kind = "project"
      self._files[filename] = kind
    return kind

  def _code_kind(self, code):
    kind = self._codes.get(code)
    if kind is None:
      if self._file_kind(code.co_filename) != "project":
        kind = "other"
      elif "<" in code.co_qualname or code.co_flags & _UNTRACEABLE:
        kind = "unsupported"
      else:
        kind = "entry"
      self._codes[code] = kind
    return kind

  def _source(self, filename):
    if filename not in self._sources:
      with tokenize.open(filename) as f:
        text = f.read()
      self._sources[filename] = text
      self.emit({"kind": "source", "file": filename, "text": text})
    return self._sources[filename]

  # Trace functions.
  def global_trace(self, frame, event, arg):
    entry = self.entry
    if entry is not None:
      if entry.dead is None and entry.recorder.global_trace(frame, event, arg):
        entry.frames.add(frame)
        return self.local_trace
      return None
    code = frame.f_code
    kind = self._code_kind(code)
    caller = frame.f_back
    if kind == "other" or caller is None or self._file_kind(caller.f_code.co_filename) != "test":
      return None
    if (
      kind == "unsupported"
      or self.per_test >= self.limits["max_traces_per_test"]
      or (self._per_function.get(code, 0) >= self.limits["max_traces_per_function"])
    ):
      self.emit(
        {
          "kind": "skip",
          "reason": "unsupported" if kind == "unsupported" else "capped",
          "test": self.test,
          "function": code.co_qualname,
        }
      )
      return None
    self.per_test += 1
    self._per_function[code] = self._per_function.get(code, 0) + 1
    filename = code.co_filename
    recorder = self.tracer.Recorder(
      filename,
      self._source(filename),
      max_events=self.limits["max_events"],
      max_bytes=self.limits["max_bytes"],
      max_value_chars=self.limits["max_value_chars"],
      abort=self._abort,
    )
    self.entry = _Entry(recorder, frame, code.co_qualname, self.test)
    recorder.global_trace(frame, event, arg)
    return self.local_trace

  def local_trace(self, frame, event, arg):
    entry = self.entry
    if entry is None or frame not in entry.frames:
      return None
    if entry.dead is None:
      entry.recorder.local_trace(frame, event, arg)
    if event == "return" and frame is entry.frame:
      self.finish()
    return self.local_trace

  def _abort(self, error):
    if self.entry is not None and self.entry.dead is None:
      self.entry.dead = (error.status, error.message)
      for frame in self.entry.frames:  # only call/return events from now on: the rest is cheap
        frame.f_trace_lines = False

  def finish(self, status=None, message=""):
    entry, self.entry = self.entry, None
    if entry is None:
      return
    if status is None and entry.dead:
      status, message = entry.dead
    frames = entry.recorder.frames if status is None else []
    filename = entry.frame.f_code.co_filename
    self.emit(
      {
        "kind": "trace",
        "file": filename,
        "rel": os.path.relpath(os.path.realpath(filename), self.root),
        "function": entry.function,
        "test": entry.test,
        "status": status or "ok",
        "frames": frames,
        "message": message,
      }
    )

  def on_timeout(self):
    if self.entry is not None and self.entry.dead is None:
      self.entry.dead = ("timeout", "the test ran past per_test_timeout_s")


class Plugin:
  """pytest plugin: traces each test's setup, call and teardown with a wall-clock limit."""

  def __init__(self, tracer, emit, timeout_s):
    self.tracer, self.emit, self.timeout_s = tracer, emit, timeout_s
    self.outcomes = {}

  def _alarm(self, signum, frame):
    del signum, frame
    self.tracer.on_timeout()
    self.outcomes[self.tracer.test] = "timeout"
    raise TestTimeout(f"test ran past {self.timeout_s} s")

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(self, item, nextitem):
    del nextitem
    self.tracer.test, self.tracer.per_test = item.nodeid, 0
    previous = signal.signal(signal.SIGALRM, self._alarm)
    signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
    sys.settrace(self.tracer.global_trace)
    try:
      yield
    finally:
      sys.settrace(None)
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, previous)
      self.tracer.finish("error", "the test ended while the traced call was running")
      self.emit(
        {"kind": "test", "test": item.nodeid, "outcome": self.outcomes.get(item.nodeid, "passed")}
      )

  def pytest_runtest_logreport(self, report):
    if report.failed and self.outcomes.get(report.nodeid) != "timeout":
      self.outcomes[report.nodeid] = "failed"


def _load_tracer(source):
  module = types.ModuleType("_cwm_tracer")
  exec(compile(source, "<cwm_jax tracer>", "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def _recreate(request):
  """Writes the shipped project under ./project and points root and tests there."""
  root = os.path.realpath("project")
  for rel, data in request["files"].items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(base64.b64decode(data))
  request["tests"] = [
    os.path.join(root, os.path.relpath(t, request["root"])) for t in request["tests"]
  ]
  request["root"] = root


def main():
  request = json.load(sys.stdin)
  out = os.fdopen(os.dup(1), "w", encoding="utf-8")
  os.dup2(2, 1)  # pytest's report goes to stderr; stdout carries only JSON lines

  def emit(message):
    out.write(json.dumps(message) + "\n")
    out.flush()

  if request.get("files"):
    _recreate(request)
  sys.path.insert(0, request["root"])
  tracer = RepoTracer(request, _load_tracer(request["tracer"]), emit)
  plugin = Plugin(tracer, emit, request["per_test_timeout_s"])
  code = pytest.main(
    [
      *request["tests"],
      "-q",
      "--tb=line",
      "-p",
      "no:cacheprovider",
      "--rootdir",
      request["root"],
      *request.get("pytest_args", ()),
    ],
    plugins=[plugin],
  )
  emit({"kind": "done", "exit_code": int(code)})


if __name__ == "__main__":
  main()
