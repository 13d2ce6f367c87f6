"""The Beam pipeline (DirectRunner, 2 worker processes) builds the same corpus as the local build."""

import json
import os

import pytest

from cwm_jax.data import corpus_build, repo_traces, traces

beam = pytest.importorskip("apache_beam")

PROJECT = {
  "shapes.py": "def area(w, h):\n    a = w * h\n    return a\n\n\n"
  "def grow(sizes):\n    return [area(s, s) for s in sizes]\n",
  "test_shapes.py": "import shapes\n\n\ndef test_area():\n    assert shapes.area(2, 3) == 6\n"
  "    assert shapes.area(2, 3) == 6\n\n\n"
  "def test_grow():\n    assert shapes.grow([1, 2]) == [1, 4]\n",
}
CALLS = [
  {"source": "def inc(x):\n    return x + 1\n", "function": "inc", "args": [i % 3]}
  for i in range(5)
]


def _texts(folder):
  import grain  # pylint: disable=g-import-not-at-top

  files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".array_record"))
  source = grain.sources.ArrayRecordDataSource(files)
  return sorted(json.loads(source[i])["text"] for i in range(len(source)))


def test_direct_runner_matches_the_local_build(tmp_path):
  root = tmp_path / "proj"
  root.mkdir()
  for name, text in PROJECT.items():
    (root / name).write_text(text)
  jsonl = tmp_path / "calls.jsonl"
  jsonl.write_text("".join(json.dumps(c) + "\n" for c in CALLS))
  items = repo_traces.repo_test_items(str(root)) + corpus_build.trace_items(
    "functions", functions_jsonl=str(jsonl), doctest_modules=[], programs=False
  )
  manifests = {}
  for runner in ("local", "DirectRunner"):
    cfg = corpus_build.TraceBuildConfig(
      workers=2, runner=runner, progress=False, trace_limits=traces.Limits(timeout_s=20)
    )
    manifests[runner] = corpus_build.build_trace_corpus(
      "mixed", items, str(tmp_path / runner), cfg, num_shards=2
    )
  local, direct = manifests["local"], manifests["DirectRunner"]
  # area twice from test_area (one duplicate) + grow; inc(0), inc(1), inc(2) (two duplicates).
  assert local["records"] == 5 and local["dropped"]["duplicate"] == 3
  for key in (
    "records",
    "candidates",
    "kept",
    "dropped",
    "dedup",
    "decontamination",
    "not_traced",
    "tests",
  ):
    assert direct[key] == local[key], key
  assert direct["shards"] == [
    "mixed-00000-of-00002.array_record",
    "mixed-00001-of-00002.array_record",
  ]
  assert _texts(tmp_path / "DirectRunner") == _texts(tmp_path / "local")
  with open(tmp_path / "DirectRunner" / "manifest.json") as f:
    assert json.load(f) == direct
  assert sorted(os.listdir(tmp_path / "DirectRunner")) == ["manifest.json", *direct["shards"]]
