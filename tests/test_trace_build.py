"""Trace corpora: functions JSONL source, dedup, decontamination, the parallel build and CLI."""

import bisect
import importlib.util
import json
import os
import subprocess
import sys

import grain
import pytest

from cwm_jax.base import ConfigError
from cwm_jax.data import corpus_build, dedup, sources_functions, traces
from cwm_jax.data.traces import examples

PROGRAM = """\
import time


def square(x):
    y = x * x
    return y


def spin():
    time.sleep(60)


def loop(n):
    for i in range(n):
        pass


def boom(n):
    raise ValueError(n)
"""


def _read(folder):
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".array_record"))
  source = grain.sources.ArrayRecordDataSource(files)
  return [json.loads(source[i]) for i in range(len(source))]


def _held_out_program():
  call = next(c for c in examples.program_calls() if examples.is_held_out(c.origin))
  return call


def test_dedup_key_ignores_layout_not_content():
  frames = [{"event": "call", "locals": {"x": "3"}}]
  key = dedup.dedup_key(PROGRAM, "square", frames, "T")
  assert key == dedup.dedup_key(PROGRAM.replace("\n\n\n", "\n") + "   \n", "square", frames, "T")
  assert key != dedup.dedup_key(PROGRAM, "square", [{"event": "call", "locals": {"x": "4"}}], "T")
  assert key != dedup.dedup_key(PROGRAM, "square", frames, "T2")
  assert key != dedup.dedup_key(PROGRAM.replace("x * x", "x + x"), "square", frames, "T")


def test_decontamination_by_ngram_overlap(tmp_path):
  held = dedup.held_out_programs()
  assert held and all(k.startswith("held_out:") for k in held)
  d = dedup.Decontaminator(held)
  name, source = next(iter(held.items()))
  assert d.match(source) == name
  # A copy inside a larger file, with different layout and comments, is still caught.
  disguised = (
    "# header\nimport os\n" + source.replace("\n", "  # c\n") + "\n\ndef extra():\n  pass\n"
  )
  assert d.match(disguised) == name
  with open(bisect.__file__, encoding="utf-8") as f:
    assert d.match(f.read()) is None  # unrelated real code
  assert d.match(PROGRAM) is None
  # A user evaluation set: a .py file and a JSONL line.
  user = tmp_path / "eval"
  user.mkdir()
  (user / "prog.py").write_text(PROGRAM)
  (tmp_path / "more.jsonl").write_text(json.dumps({"source": "def f(a):\n  return a"}) + "\n")
  docs = dedup.read_eval_set([str(user), str(tmp_path / "more.jsonl")])
  assert sorted(docs.values()) == sorted([PROGRAM, "def f(a):\n  return a"])
  assert dedup.Decontaminator(docs).match("import sys\n" + PROGRAM) == str(user / "prog.py")
  with pytest.raises(ValueError, match="does not exist"):
    dedup.read_eval_set(["/no/such/eval"])
  with pytest.raises(ValueError, match="n >= 1"):
    dedup.Decontaminator(held, n=0)


def test_function_specs_are_validated(tmp_path):
  (tmp_path / "prog.py").write_text(PROGRAM)
  good = tmp_path / "calls.jsonl"
  good.write_text(
    json.dumps({"path": "prog.py", "function": "square", "args": [3]})
    + "\n\n"
    + json.dumps({"source": PROGRAM, "function": "boom", "args": [1], "kwargs": {}})
    + "\n"
  )
  calls = sources_functions.read_function_specs(str(good))
  assert [(c.function, c.args) for c in calls] == [("square", (3,)), ("boom", (1,))]
  assert calls[0].source == PROGRAM and calls[0].origin == str(tmp_path / "prog.py")
  for line, message in [
    ('{"function": "f"}', "exactly one of"),
    ('{"source": "x", "path": "y", "function": "f"}', "exactly one of"),
    ('{"source": "x", "function": "f", "args": 3}', "JSON list"),
    ('{"source": "x", "func": "f"}', "unknown fields"),
    ('{"path": "missing.py", "function": "f"}', "relative to the JSONL"),
    ("not json", "not JSON"),
  ]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
      sources_functions.read_function_specs(str(bad))
    assert "bad.jsonl:2" in str(e.value)


def test_functions_corpus_counts_every_drop_reason(tmp_path):
  held = _held_out_program()
  specs = [
    {"source": PROGRAM, "function": "square", "args": [3]},
    {"source": PROGRAM + "\n\n", "function": "square", "args": [3]},  # duplicate
    {"source": PROGRAM, "function": "square", "args": [4]},
    {"source": PROGRAM, "function": "boom", "args": [2]},  # raises: still a trace
    {"source": PROGRAM, "function": "spin"},  # timeout
    {"source": PROGRAM, "function": "missing"},  # error
    {"source": PROGRAM, "function": "loop", "args": [20000]},  # too_long
    {"source": held.source, "function": held.function, "args": list(held.args)},
  ]
  jsonl = tmp_path / "calls.jsonl"
  jsonl.write_text("".join(json.dumps(s) + "\n" for s in specs))
  # 'spin' sleeps past the 8 s wall-clock limit; the passing calls get room on a busy machine.
  cfg = corpus_build.TraceBuildConfig(
    workers=2, trace_limits=traces.Limits(timeout_s=8), progress=False
  )
  manifest = corpus_build.build_corpus(
    "functions",
    str(tmp_path / "out"),
    config=cfg,
    functions_jsonl=str(jsonl),
    doctest_modules=[],
    programs=False,
  )
  assert manifest["candidates"] == 8 and manifest["kept"] == manifest["records"] == 3
  assert manifest["dropped"] == {
    "timeout": 1,
    "memory": 0,
    "output_limit": 0,
    "too_long": 1,
    "error": 1,
    "duplicate": 1,
    "contaminated": 1,
  }
  assert manifest["decontamination"]["by_program"] == {
    "held_out:" + os.path.basename(held.origin): 1
  }
  records = _read(str(tmp_path / "out"))
  with open(tmp_path / "out" / "manifest.json") as f:
    assert json.load(f) == manifest
  expected = [
    traces.format_trace(PROGRAM, f, traces.trace_call(PROGRAM, f, a).frames)
    for f, a in [("square", (3,)), ("square", (4,)), ("boom", (2,))]
  ]
  assert [r["text"] for r in records] == expected  # build order, first duplicate kept


def test_repo_traces_cli_with_two_workers(tmp_path):
  out = tmp_path / "repo"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.data.build",
      "--corpus=repo_traces",
      f"--out={out}",
      "--stdlib_tests=test_colorsys,test_bisect",
      "--workers=2",
      "--shards=2",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "traced item" in run.stderr  # progress on stderr (DirectRunner, the default)
  manifest = json.loads(run.stdout.strip().splitlines()[-1])
  records = _read(str(out))
  assert len(records) == manifest["records"] == manifest["kept"] > 50
  assert manifest["candidates"] == manifest["kept"] + sum(manifest["dropped"].values())
  assert manifest["workers"] == 2 and manifest["tests"]["passed"] > 20
  origins = {r["origin"].split(":")[0] for r in records}
  assert {"colorsys.py", "bisect.py"} <= origins
  for r in records[:20]:
    assert traces.parse_frames(r["text"]) and r["text"].endswith("<|end_of_text|>")
  texts = [r["text"] for r in records]
  assert len(set(texts)) == len(texts)  # exact duplicates are gone


def test_bad_build_arguments_exit_2(tmp_path):
  for flags, message in [
    (["--corpus=repo_traces", f"--repo={tmp_path}/none"], "not a directory"),
    (["--corpus=functions", f"--functions={tmp_path}/x.jsonl"], "No such"),
    (["--corpus=repo_traces", "--workers=0"], "at least 1"),
    (["--corpus=code", "--", "--direct_num_workers=2"], "Beam --runner"),
    (["--corpus=repo_traces", "--stdlib_tests=test_nope"], "no standard"),
  ] + (
    []
    if importlib.util.find_spec("apache_beam")
    else [
      (
        ["--corpus=functions", "--noprograms", "--doctest_modules=", "--runner=DirectRunner"],
        "cwm_jax[data]",
      )
    ]
  ):
    run = subprocess.run(
      [sys.executable, "-m", "cwm_jax.data.build", f"--out={tmp_path}/o", *flags],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 2 and message in run.stderr, (flags, run.stderr[-1500:])
  with pytest.raises(ConfigError, match="name must be one of"):
    corpus_build.corpus_entries([{"kind": "corpus", "name": "poems"}])
  assert corpus_build.corpus_entries([{"kind": "corpus", "name": "repo_traces", "limit": 1}])
