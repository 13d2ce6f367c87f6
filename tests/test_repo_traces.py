"""Repository traces: pytest under the tracer, entries = calls from tests into project code."""

import collections
import json
import os
import textwrap

import pytest

from cwm_jax.data import repo_traces, traces

CALC = """\
import time
import util


def add(a, b):
    total = a + b
    return total


def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


def scaled(x):
    y = util.double(x)
    return y + 1


def count_up(n):
    for i in range(n):
        yield i


def spin(n):
    time.sleep(n)


def long_loop(n):
    s = 0
    for i in range(n):
        s += i
    return s


class Stack:

    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(x)
        return len(self.items)
"""

UTIL = """\
def double(x):
    return 2 * x
"""

TESTS = """\
import calc


def helper(v):
    return calc.add(v, 1)


def test_add():
    assert calc.add(2, 3) == 5
    assert helper(4) == 5


def test_fib():
    assert calc.fib(5) == 5


def test_scaled_and_stack():
    assert calc.scaled(3) == 7
    s = calc.Stack()
    assert s.push('a') == 1


def test_generator_is_unsupported():
    assert list(calc.count_up(3)) == [0, 1, 2]


def test_spin_times_out():
    calc.spin(60)


def test_too_long():
    assert calc.long_loop(20000) == sum(range(20000))


def test_capped():
    for i in range(10):
        calc.add(i, i)


def test_after_the_timeout_still_traced():
    assert calc.add(10, 20) == 30
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
  root = tmp_path_factory.mktemp("proj")
  (root / "calc.py").write_text(CALC)
  (root / "util.py").write_text(UTIL)
  (root / "tests").mkdir()
  (root / "tests" / "test_calc.py").write_text(TESTS)
  return str(root)


@pytest.fixture(scope="module")
def traced(project):
  items = repo_traces.repo_test_items(project)
  assert [os.path.basename(i.path) for i in items] == ["test_calc.py"]
  limits = repo_traces.RepoLimits(per_test_timeout_s=3, max_traces_per_test=8, module_timeout_s=120)
  return repo_traces.trace_test_module(items[0], limits)


def _by_test(candidates):
  out = collections.defaultdict(list)
  for c in candidates:
    out[c.origin.split("::")[-1]].append(c)
  return out


def test_entries_are_calls_from_tests_into_the_project(traced):
  candidates, counts = traced
  by_test = _by_test(candidates)
  assert [(c.function, c.status) for c in by_test["test_add"]] == [("add", "ok"), ("add", "ok")]
  # The recursion is one trace (nested calls of the same file belong to the entry).
  (fib,) = by_test["test_fib"]
  assert sum(f["event"] == "call" for f in fib.frames) == 15
  # util.double is called by project code, not by a test: not an entry, not in scaled's trace.
  assert [c.function for c in by_test["test_scaled_and_stack"]] == [
    "scaled",
    "Stack.__init__",
    "Stack.push",
  ]
  assert all("2 * x" not in f["line"] for c in candidates for f in c.frames)
  assert not by_test["test_generator_is_unsupported"] and counts["unsupported"] >= 1
  assert all(c.origin.startswith("calc.py:") for c in candidates)


def test_repo_traces_equal_trace_call(traced):
  """The independent reference: tracing the same call alone in the sandbox."""
  candidates, _ = traced
  seen = 0
  for c in candidates:
    if c.status != "ok" or c.function not in ("add", "fib", "long_loop"):
      continue
    args = tuple(
      json.loads(c.frames[0]["locals"][name])
      for name in ("a", "b")
      if name in c.frames[0]["locals"]
    ) or (json.loads(c.frames[0]["locals"]["n"]),)
    # util is importable only in the project; the line stays so that line numbers agree.
    alone = traces.trace_call(c.source.replace("import util", "util = None"), c.function, args)
    assert alone.status == "ok" and alone.frames == c.frames, (c.origin, alone.message)
    seen += 1
  assert seen >= 4


def test_per_test_limits(traced):
  candidates, counts = traced
  by_test = _by_test(candidates)
  assert [c.status for c in by_test["test_spin_times_out"]] == ["timeout"]
  assert [c.status for c in by_test["test_too_long"]] == ["too_long"]
  assert len(by_test["test_capped"]) == 8 and counts["capped"] == 2
  # The session goes on after a test timed out.
  assert [c.status for c in by_test["test_after_the_timeout_still_traced"]] == ["ok"]
  assert counts["tests_timeout"] == 1 and counts["tests_passed"] == 7


def test_stdlib_test_suite_is_an_example_source():
  (item,) = repo_traces.stdlib_test_items(["test_colorsys"])
  candidates, counts = repo_traces.trace_test_module(item)
  ok = [c for c in candidates if c.status == "ok"]
  assert counts["tests_passed"] >= 5 and not counts["tests_failed"]
  assert {c.function for c in ok} >= {"rgb_to_hls", "hls_to_rgb", "rgb_to_hsv", "hsv_to_rgb"}
  c = next(c for c in ok if c.function == "rgb_to_hsv")
  args = tuple(json.loads(c.frames[0]["locals"][k]) for k in ("r", "g", "b"))
  assert traces.trace_call(c.source, c.function, args).frames == c.frames
  with pytest.raises(ValueError, match="no standard-library test module"):
    repo_traces.stdlib_test_items(["test_no_such_module"])
  whole = repo_traces.stdlib_test_items(None)  # the whole suite, on request
  assert len(whole) > 100 and item in whole


def test_bad_inputs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    repo_traces.repo_test_items(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="no test_"):
    repo_traces.repo_test_items(str(tmp_path))
  with pytest.raises(ValueError, match="must be positive"):
    repo_traces.RepoLimits(per_test_timeout_s=0)
  (tmp_path / "test_broken.py").write_text(
    textwrap.dedent("""\
      import does_not_exist
      def test_x():
          pass
      """)
  )
  (item,) = repo_traces.repo_test_items(str(tmp_path))
  candidates, counts = repo_traces.trace_test_module(item)
  assert candidates == [] and not counts["tests_passed"]


def test_a_repository_url_is_refused_by_name():
  from cwm_jax.data import repo_traces

  with pytest.raises(ValueError, match="must be a local checkout, not a URL"):
    repo_traces.repo_test_items("gs://bucket/repo")
