"""Execution traces and the sandbox, checked against the interpreter itself.

The reference reader below is a separate, minimal `sys.settrace` recorder run in this process;
the traces under test come from the sandboxed child process.
"""

import ast
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

from cwm_jax.data import traces
from cwm_jax.data.traces import isolation, pyast

_PROGRAM = "<reference program>"


def _same_types(a, b):
  if type(a) is not type(b):
    return False
  if isinstance(a, list):
    return len(a) == len(b) and all(map(_same_types, a, b))
  if isinstance(a, dict):
    return list(a) == list(b) and all(_same_types(a[k], b[k]) for k in a)
  return True


def _reference_encoding(value):
  """JSON if it reads back as the same value with the same types, else repr without addresses."""
  try:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if _same_types(json.loads(text), value) and json.loads(text) == value:
      return text
  except (TypeError, ValueError):
    pass
  try:
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))
  except Exception:  # e.g. a __repr__ reading attributes __init__ has not set yet
    return f"<{type(value).__name__} object (repr failed)>"


def reference_trace(source, function, args):
  """(event, lineno, full locals | value) for every event of code compiled from `source`."""
  module = types.ModuleType("program")
  sys.modules["program"] = module
  exec(compile(source, _PROGRAM, "exec"), module.__dict__)
  events = []

  def tracer(frame, event, arg):
    if frame.f_code.co_filename != _PROGRAM:
      return None
    if event in ("call", "line"):
      payload = {k: _reference_encoding(v) for k, v in frame.f_locals.items() if k.isidentifier()}
    elif event == "return":
      payload = _reference_encoding(arg)
    else:
      payload = repr(arg[1])
    events.append((event, frame.f_lineno, payload))
    return tracer

  sys.settrace(tracer)
  try:
    result = module.__dict__[function](*args)
    if isinstance(result, types.GeneratorType):
      list(result)
  except Exception:
    pass
  finally:
    sys.settrace(None)
    del sys.modules["program"]
  return events


def as_reference(frames):
  """Our frames in the reference's shape, read back from the trace text with '..' resolved."""
  parsed = traces.parse_frames(traces.format_frames(frames))
  assert len(parsed) == len(frames)
  full = traces.resolve_locals(parsed)
  return [
    (p["event"], f["lineno"], full[i] if p["locals"] is not None else p["value"])
    for i, (p, f) in enumerate(zip(parsed, frames))
  ]


# (program, function, args): loops, recursion, generators, exceptions, classes, closures, ...
CASES = [
  ("fizzbuzz.py", "fizzbuzz", (5,)),
  ("recursion.py", "hanoi", (2,)),
  ("recursion.py", "fib", (5,)),
  ("generators.py", "first_primes", (3,)),
  ("generators.py", "countdown", (2,)),
  ("exceptions.py", "safe_ratios", ([(1, 2), (3, 0)],)),
  ("exceptions.py", "parse_pairs", ("x=1;y",)),
  ("bank_account.py", "simulate", ([("in", 5), ("out", 500)],)),
  ("closures.py", "use_counter", ([1, 2],)),
  ("closures.py", "count_paths", (3,)),
  ("inventory.py", "restock", ([("apple", 3, 0.5), ("apple", 1, 0.5)],)),
  ("word_stats.py", "invert", ({1: "x", 2: "y", 3: "x"},)),  # int sets: same order here
]


def _program(name):
  with open(os.path.join(traces.PROGRAMS_DIR, name), encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("name,function,args", CASES)
def test_trace_agrees_with_reference_settrace(name, function, args):
  source = _program(name)
  result = traces.trace_call(source, function, args)
  assert result.status == "ok", result.message
  assert as_reference(result.frames) == reference_trace(source, function, args)
  lines = source.split("\n")
  assert all(f["line"] == lines[f["lineno"] - 1] for f in result.frames)


def test_unchanged_values_are_dots_and_text_is_exact():
  source = "def f(n):\n    s = 0\n    s += n\n    return s\n"
  result = traces.trace_call(source, "f", (2,))
  # Hand-derived: line events fire before each line runs; '..' repeats the previous frame.
  expected = (
    '<|call_sep|>{"n": "2"}<|action_sep|>def f(n):<|frame_sep|>'
    '<|line_sep|>{"n": ".."}<|action_sep|>    s = 0<|frame_sep|>'
    '<|line_sep|>{"n": "..", "s": "0"}<|action_sep|>    s += n<|frame_sep|>'
    '<|line_sep|>{"n": "..", "s": "2"}<|action_sep|>    return s<|frame_sep|>'
    '<|return_sep|><|action_sep|>    return s<|arg_sep|>"2"<|frame_sep|><|end_of_text|>'
  )
  assert traces.format_frames(result.frames) == expected
  assert traces.format_prompt(source, "f") == (
    "<|begin_of_text|><|trace_context_start|>def f(n):  # << START_OF_TRACE\n    s = 0\n"
    "    s += n\n    return s\n<|frame_sep|>"
  )


def test_uncaught_exception_ends_with_exception_then_return():
  result = traces.trace_call(_program("exceptions.py"), "checked_average", ([],))
  assert result.status == "ok" and "ValueError" in result.message
  assert [f["event"] for f in result.frames][-2:] == ["exception", "return"]
  assert result.frames[-2]["value"] == "ValueError('average of an empty list')"


def test_values_without_json_form_and_huge_values():
  encode = traces.encode_value
  assert encode((1, 2)) == "(1, 2)" and encode({1: "a"}) == "{1: 'a'}"
  assert encode(float("nan")) == "nan" and encode([1, "x", None]) == '[1, "x", null]'
  cycle = [1]
  cycle.append(cycle)
  assert encode(cycle) == repr(cycle)
  assert " at 0x" not in encode(object()) and encode(object()) == "<object object>"
  big = encode(list(range(10**6)), limit=100)
  assert big.endswith(traces.TRUNCATION_MARKER) and len(big) == 100 + len(traces.TRUNCATION_MARKER)
  assert big.startswith("[0, 1, 2, ")
  assert encode(10**5000).startswith("<int with")
  source = "def f():\n    xs = list(range(100000))\n    return xs\n"
  result = traces.trace_call(source, "f", limits=traces.Limits(max_value_chars=50))
  assert result.status == "ok"
  assert result.frames[-1]["value"].endswith(traces.TRUNCATION_MARKER)


def test_trace_limits_are_statuses():
  loop = "def spin():\n    n = 0\n    while True:\n        n += 1\n"
  assert traces.trace_call(loop, "spin").status == "too_long"
  slow = traces.trace_call(
    loop, "spin", limits=traces.Limits(timeout_s=1, max_events=10**9, max_trace_bytes=10**9)
  )
  assert slow.status == "timeout" and slow.frames == []
  bomb = "def grow():\n    xs = []\n    while True:\n        xs.append(bytearray(10**7))\n"
  limits = traces.Limits(memory_mb=300, max_events=10**9, max_trace_bytes=10**9)
  assert traces.trace_call(bomb, "grow", limits=limits).status == "memory"
  chatty = 'def talk():\n    print("x" * 100000)\n'
  assert traces.trace_call(chatty, "talk", limits=traces.Limits(output_bytes=1000)).status == (
    "output_limit"
  )


def test_network_is_blocked_in_traced_code():
  if isolation.fallback_refusal():  # the in-process block is what the fallback relies on
    pytest.skip(isolation.fallback_refusal())
  source = (
    "import socket\n\ndef fetch():\n    try:\n"
    '        socket.create_connection(("127.0.0.1", 9), timeout=1)\n'
    "    except OSError as e:\n        err = e\n"
    "    raw = socket.socket.__mro__[-2]  # the C socket type, behind the patched names\n"
    "    return raw()\n"
  )
  result = traces.trace_call(
    source, "fetch", limits=traces.Limits(namespaces=False, allow_no_isolation=True)
  )
  assert result.status == "ok"
  raised = [f["value"] for f in result.frames if f["event"] == "exception"]
  assert len(raised) == 2 and all("network access is disabled" in v for v in raised)
  assert "network access is disabled" in result.message


def test_run_python_sandbox():
  ok = traces.run_python(
    'import os, sys\nprint(sys.stdin.read().upper(), os.listdir("."), sorted(os.environ))',
    stdin="hi",
  )
  assert ok.status == "ok" and ok.returncode == 0
  assert ok.stdout.startswith("HI ['program.py'] ") and "PYTHONHASHSEED" in ok.stdout
  assert "PYTHONPATH" not in ok.stdout and "VIRTUAL_ENV" not in ok.stdout
  hashes = [traces.run_python('print(hash("abc"), {"x", "y", "z"})').stdout for _ in range(2)]
  assert hashes[0] == hashes[1]  # fixed hash seed: set order, hence traces, reproducible
  assert (
    traces.run_python("while True: pass", limits=traces.Limits(timeout_s=1)).status == "timeout"
  )
  assert traces.run_python("x = bytearray(4 << 30)").status == "memory"
  spam = traces.run_python('while True: print("y" * 999)', limits=traces.Limits(output_bytes=5000))
  assert spam.status == "output_limit" and len(spam.stdout) <= 5000
  net = traces.run_python('import urllib.request\nurllib.request.urlopen("http://10.0.0.1")')
  assert net.status == "error" and "network access is disabled" in net.stderr
  failed = traces.run_python("import os\nprint(os.getcwd())\nraise SystemExit(3)")
  assert failed.status == "error" and failed.returncode == 3
  assert not os.path.exists(failed.stdout.strip())  # the scratch directory is gone


def test_parse_frames_inverts_format_and_stops_at_damage():
  result = traces.trace_call(_program("strings.py"), "caesar", ("a<|b", 1))
  assert result.status == "ok"
  text = traces.format_trace(_program("strings.py"), "caesar", result.frames)
  assert "<|b" not in text.split("<|frame_sep|>", 1)[1]  # values cannot forge tokens
  expected = [dict(f, lineno=None) for f in result.frames]
  assert traces.parse_frames(text) == expected
  frames_text = traces.format_frames(result.frames)
  cut = frames_text[: len(frames_text) // 2]
  n = cut.count("<|frame_sep|>")
  assert traces.parse_frames(cut) == expected[:n]
  third = [m.end() for m in re.finditer(re.escape("<|frame_sep|>"), frames_text)][2]
  garbled = frames_text[:third] + "<|line_sep|>{not json<|action_sep|>x<|frame_sep|>" + frames_text
  assert traces.parse_frames(garbled) == expected[:3]
  with pytest.raises(ValueError, match="special token"):
    traces.format_prompt('x = "<|frame_sep|>"\ndef f():\n    pass\n', "f")


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="no top-level function"):
    traces.trace_call("def f():\n    pass\n", "g")
  with pytest.raises(ValueError, match="literals"):
    traces.trace_call("def f(x):\n    pass\n", "f", (object(),))
  with pytest.raises(ValueError, match="timeout_s must be positive"):
    traces.Limits(timeout_s=0)


def test_shipped_programs_and_doctests():
  calls = traces.program_calls()
  assert len({c.origin for c in calls}) >= 15 and len(calls) >= 40
  statistics_calls = traces.doctest_calls("statistics")
  median = next(c for c in statistics_calls if c.function == "median" and c.args == ([1, 3, 5],))
  result = traces.trace_call(median.source, median.function, median.args)
  assert result.status == "ok" and result.frames[-1] == dict(
    result.frames[-1], event="return", value="3"
  )
  with pytest.raises(ValueError, match="pure-Python"):
    traces.doctest_calls("json")


def _cli(*argv):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "cwm_jax.trace", *argv],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )


def test_cli_text_and_json():
  path = os.path.join(traces.PROGRAMS_DIR, "search.py")
  expected = traces.trace_call(_program("search.py"), "binary_search", ([1, 3, 5], 5))
  text = _cli(f"{path}:binary_search", "--args", "([1, 3, 5], 5)")
  assert text.returncode == 0, text.stderr
  assert (
    text.stdout
    == traces.format_trace(_program("search.py"), "binary_search", expected.frames) + "\n"
  )
  as_json = _cli(f"{path}:binary_search", "--args", "([1, 3, 5], 5)", "--format", "json")
  assert json.loads(as_json.stdout) == expected.frames
  bad = _cli(f"{path}:binary_search", "--args", "5")
  assert bad.returncode == 2 and "tuple" in bad.stderr


def test_sandbox_never_forks_the_jax_parent():
  """Limits are applied by the child itself: no fork-with-threads from a JAX process."""
  import warnings

  import jax.numpy as jnp

  jnp.ones(2).block_until_ready()  # JAX's threads are running
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    result = traces.run_python(
      "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0])",
      limits=traces.Limits(memory_mb=300),
    )
  assert result.status == "ok" and int(result.stdout) == 300 << 20


def test_line_event_limit_counts_line_events_only():
  # f(n) makes n calls with one line event each (plus call/return events): 3n events in all.
  source = "def g(i):\n    return i\n\ndef f(n):\n    for i in range(n):\n        g(i)\n"
  lines = 31 + 30  # f: the `for` line 31 times (30 passes + the exit), its body 30 times
  total_lines = lines + 30  # g: one line event per call
  ok = traces.trace_call(source, "f", (30,), limits=traces.Limits(max_events=total_lines))
  assert ok.status == "ok"
  assert sum(fr["event"] == "line" for fr in ok.frames) == total_lines < len(ok.frames)
  over = traces.trace_call(source, "f", (30,), limits=traces.Limits(max_events=total_lines - 1))
  assert over.status == "too_long"


def test_parses_in_worker_threads_take_turns(monkeypatch):
  """CPython 3.11's AST constructor keeps its recursion depth in interpreter-wide state,
  so parses in two threads at once can raise SystemError (a trace-build test failed so
  under load): code that runs in the trace builder's threads parses through `pyast`,
  which lets one parse run at a time."""
  active, most, real = [0], [0], ast.parse

  def slow_parse(*args, **kwargs):  # holds the parse open long enough for others to join
    active[0] += 1
    most[0] = max(most[0], active[0])
    time.sleep(0.05)
    active[0] -= 1
    return real(*args, **kwargs)

  monkeypatch.setattr(ast, "parse", slow_parse)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    values = list(pool.map(lambda i: pyast.literal_eval(f"  [{i}, 'x']"), range(8)))
  assert values == [[i, "x"] for i in range(8)]
  assert most[0] == 1
