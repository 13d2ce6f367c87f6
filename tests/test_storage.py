"""The path layer (`cwm_jax.storage`) on a local folder and on a gs:// bucket (the fake GCS
server of conftest), and the data layer and RL task files read from a bucket: every result is
compared with the same operation on local disk."""

import json
import os
import pickle
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.data import corpora, corpus_build, dedup, pipeline, sources, sources_functions
from cwm_jax.data import tokenizer as tokenizer_lib
from cwm_jax.rl import datasets
from cwm_jax.rl import trainer as rl_trainer


def _bucket(gcs) -> str:
  """A new bucket for one test: 'gs://NAME'."""
  return gcs.bucket(f"t-{uuid.uuid4().hex[:20]}")


def _bucket_name(url: str) -> str:
  return url[len("gs://") :].split("/", 1)[0]


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  """An empty folder: a local one, or a prefix in a new bucket."""
  if request.param == "local":
    path = str(tmp_path / "root")
    os.makedirs(path)
    return path
  return _bucket(request.getfixturevalue("gcs")) + "/root"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A private object cache (`storage.local_copy`) for one test."""
  path = str(tmp_path / "cache")
  monkeypatch.setenv("CWM_CACHE_DIR", path)
  monkeypatch.setenv("CWM_CACHE_GB", "1")
  return path


@pytest.fixture
def copies(monkeypatch):
  """The (src, dst) of every `storage.copy_file`, in order."""
  calls, copy = [], storage.copy_file

  def spy(src, dst):
    calls.append((str(src), str(dst)))
    copy(src, dst)

  monkeypatch.setattr(storage, "copy_file", spy)
  return calls


# ---------------------------------------------------------------- the path layer itself


def test_files_read_list_glob_and_remove_alike(root, request):
  j = lambda *p: storage.join(root, *p)  # noqa: E731
  storage.write_bytes(j("a", "b.bin"), b"\x00\x01\xff")
  storage.write_text(j("a", "c.txt"), "first")
  storage.write_text(j("a", "c.txt"), "héllo")  # a rewrite replaces the whole file
  storage.write_json(j("a", "sub", "d.json"), {"k": [1, 2]})
  with storage.open_file(j("a", "e.txt"), "w") as f:
    f.write("streamed")
  assert storage.read_bytes(j("a", "b.bin")) == b"\x00\x01\xff"
  assert storage.read_text(j("a", "c.txt")) == "héllo"
  assert storage.read_json(j("a", "sub", "d.json")) == {"k": [1, 2]}
  with storage.open_file(j("a", "e.txt")) as f:
    assert f.read() == "streamed"
  assert storage.exists(j("a", "b.bin")) and storage.isfile(j("a", "b.bin"))
  assert storage.isdir(j("a")) and storage.isdir(j("a", "sub")) and not storage.isfile(j("a"))
  assert not storage.isdir(j("a", "b.bin"))
  assert not storage.exists(j("nope")) and not storage.isdir(j("nope"))
  assert storage.listdir(j("a")) == ["b.bin", "c.txt", "e.txt", "sub"]
  assert storage.listdir(j("nope")) == []
  assert storage.glob(j("a", "*.txt")) == [j("a", "c.txt"), j("a", "e.txt")]
  assert storage.glob(j("a", "?.bin")) == [j("a", "b.bin")]
  assert storage.glob(j("a", "[ce].txt")) == [j("a", "c.txt"), j("a", "e.txt")]
  assert storage.glob(j("a", "sub", "*")) == [j("a", "sub", "d.json")]
  assert storage.glob(j("a", "*.none")) == []
  storage.remove(j("a", "b.bin"))
  assert not storage.exists(j("a", "b.bin")) and storage.exists(j("a", "c.txt"))
  storage.remove(j("a"))  # a whole tree
  storage.remove(j("a"))  # nothing left: no error
  assert not storage.exists(j("a", "sub", "d.json")) and storage.listdir(root) == []
  if storage.is_url(root):  # nothing is left in the store itself either
    assert request.getfixturevalue("gcs").objects(_bucket_name(root)) == []


def test_publish_dir_publishes_everything_with_its_marker(root, copies):
  dst = storage.join(root, "corpus")
  with storage.publish_dir(dst, marker="DONE") as stage:
    assert not storage.is_url(stage)  # writers get a local folder
    os.makedirs(os.path.join(stage, "sub"))
    for rel, data in (("x.bin", b"xx"), ("sub/y.txt", b"yy"), ("DONE", b"{}")):
      with open(os.path.join(stage, *rel.split("/")), "wb") as f:
        f.write(data)
    assert not storage.exists(dst)  # nothing is visible before the block ends
  assert storage.listdir(dst) == ["DONE", "sub", "x.bin"]
  assert storage.read_bytes(storage.join(dst, "sub", "y.txt")) == b"yy"
  assert storage.read_bytes(storage.join(dst, "x.bin")) == b"xx"
  assert storage.listdir(root) == ["corpus"]  # no staging folder left beside it
  assert not os.path.exists(stage)
  if storage.is_url(root):
    assert [storage.basename(d) for _, d in copies][-1] == "DONE"  # the marker goes last
    assert len(copies) == 3


def test_publish_dir_failure_leaves_nothing_at_dst(root):
  dst = storage.join(root, "corpus")
  with pytest.raises(RuntimeError, match="half way"):
    with storage.publish_dir(dst, marker="DONE") as stage:
      for name in ("x.bin", "DONE"):
        with open(os.path.join(stage, name), "wb") as f:
          f.write(b"data")
      raise RuntimeError("half way")
  assert not storage.exists(dst) and storage.listdir(root) == []
  assert not os.path.exists(stage)


def _fail_after_one_copy(monkeypatch):
  """The network goes away after the first file of an upload."""
  copy, done = storage.copy_file, []

  def fail_after_one(src, dst):
    if done:
      raise ConnectionError("network gone")
    copy(src, dst)
    done.append(dst)

  monkeypatch.setattr(storage, "copy_file", fail_after_one)


def test_an_interrupted_upload_leaves_no_marker(gcs, monkeypatch):
  dst = _bucket(gcs) + "/corpus"
  _fail_after_one_copy(monkeypatch)
  with pytest.raises(ConnectionError):
    with storage.publish_dir(dst, marker="DONE") as stage:
      for name in ("a.bin", "b.bin", "DONE"):  # the marker sorts first, and is still last
        with open(os.path.join(stage, name), "wb") as f:
          f.write(name.encode())
  assert storage.listdir(dst) == ["a.bin"] and not storage.exists(storage.join(dst, "DONE"))


def test_upload_tree_copies_a_local_tree_marker_last(root, tmp_path, copies):
  src = tmp_path / "src"
  (src / "d").mkdir(parents=True)
  files = {"a.txt": b"a", "d/b.txt": b"b", "m": b"marker"}
  for rel, data in files.items():
    (src / rel).write_bytes(data)
  dst = storage.join(root, "up")
  storage.upload_tree(str(src), dst, last=("m",))
  assert {rel: storage.read_bytes(storage.join(dst, *rel.split("/"))) for rel in files} == files
  assert storage.listdir(dst) == ["a.txt", "d", "m"]
  assert storage.basename(copies[-1][1]) == "m" and len(copies) == 3


def test_move_aside_and_copies_out_of_the_store(root, tmp_path):
  src, new = storage.join(root, "ckpt"), storage.join(root, "ckpt.old")
  storage.write_text(storage.join(src, "a.txt"), "a")
  storage.write_text(storage.join(src, "d", "b.txt"), "b")
  storage.move_aside(src, new)
  assert not storage.exists(src) and storage.listdir(root) == ["ckpt.old"]
  assert storage.read_text(storage.join(new, "a.txt")) == "a"
  assert storage.read_text(storage.join(new, "d", "b.txt")) == "b"
  out = tmp_path / "back"
  storage.upload_tree(new, str(out))
  assert (out / "a.txt").read_text() == "a" and (out / "d" / "b.txt").read_text() == "b"


def test_local_copy_of_a_local_file_is_the_file(tmp_path, cache):
  path = str(tmp_path / "f.bin")
  storage.write_bytes(path, b"x")
  assert storage.local_copy(path) == path and not os.path.exists(cache)


def test_local_copy_fetches_once_per_generation(gcs, cache, monkeypatch):
  url = _bucket(gcs) + "/data/f.bin"
  storage.write_bytes(url, b"one")
  fetches, open_file = [], storage.open_file

  def spy(path, mode="r", **kw):
    fetches.append(str(path))
    return open_file(path, mode, **kw)

  monkeypatch.setattr(storage, "open_file", spy)
  first = storage.local_copy(url)
  assert first.startswith(cache) and open(first, "rb").read() == b"one"
  assert storage.local_copy(url) == first and fetches == [url]  # cached: no second fetch
  storage.write_bytes(url, b"two, longer")  # a new generation of the object
  second = storage.local_copy(url)
  assert second != first and open(second, "rb").read() == b"two, longer"
  assert fetches == [url, url]
  assert storage.local_copy(url) == second and len(fetches) == 2


def test_local_copy_evicts_the_least_recently_used(gcs, cache, monkeypatch):
  monkeypatch.setenv("CWM_CACHE_GB", str(2500 / 2**30))  # room for two 1000-byte objects
  bucket = _bucket(gcs)
  urls = {n: f"{bucket}/{n}.bin" for n in "abc"}
  for n, url in urls.items():
    storage.write_bytes(url, n.encode() * 1000)
  a = storage.local_copy(urls["a"])
  time.sleep(0.05)
  b = storage.local_copy(urls["b"])
  time.sleep(0.05)
  assert storage.local_copy(urls["a"]) == a  # a is now the most recently used
  time.sleep(0.05)
  c = storage.local_copy(urls["c"])
  assert os.path.isfile(a) and os.path.isfile(c) and not os.path.isfile(b)
  assert sorted(os.listdir(cache)) == sorted(map(os.path.basename, (a, c)))
  assert open(c, "rb").read() == b"c" * 1000
  assert storage.local_copy(urls["b"]) == b and open(b, "rb").read() == b"b" * 1000
  assert not os.path.isfile(a)  # now a was the least recently used


# ---------------------------------------------------------------- the data layer on a bucket


def _records(kind, path):
  src = sources.make_source(kind, path)
  return [bytes(src[i]) for i in range(len(src))]


def _epoch(path, tokenizer=""):
  cfg = pipeline.default_data_config().to_dict()
  cfg.update(
    mixture=[{"kind": "array_record", "path": path}],
    num_epochs=1,
    read_threads=1,
    long_documents="split",
    tokenizer=tokenizer,
  )
  it = pipeline.make_iterator(cfg, seq_len=128, global_batch=2)
  return list(it), it.bad_record_counts()


def test_build_cli_to_a_bucket_reads_like_a_local_build(gcs, tmp_path, cache):
  bucket = _bucket(gcs)
  url, local = f"{bucket}/data/code", str(tmp_path / "code")
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.data.build",
      "--corpus=code",
      f"--out={url}",
      "--limit=3",
      "--shards=2",
    ],
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  manifest = json.loads(run.stdout.strip().splitlines()[-1])
  want = corpus_build.build_corpus("code", local, limit=3, num_shards=2)
  assert manifest == want and manifest["records"] == 3
  assert storage.read_json(storage.join(url, "manifest.json")) == want
  assert gcs.objects(_bucket_name(bucket), "data/code/") == [
    "data/code/code-00000-of-00002.array_record",
    "data/code/code-00001-of-00002.array_record",
    "data/code/manifest.json",
  ]
  records = _records("array_record", url)
  assert records == _records("array_record", local) and len(records) == 3
  assert {json.loads(r)["source"] for r in records} == {
    json.loads(r)["source"] for r in _records("array_record", local)
  }
  # Through the grain pipeline, with the tokenizer's rank file on the bucket as well.
  ranks = f"{bucket}/tokenizer/ranks.tiktoken"
  storage.copy_file(tokenizer_lib.DEFAULT_RANK_FILE, ranks)
  got, got_bad = _epoch(url, tokenizer=ranks)
  want_batches, want_bad = _epoch(local)
  assert len(got) == len(want_batches) > 1 and got_bad == want_bad
  for g, w in zip(got, want_batches):
    assert g.keys() == w.keys()
    for k in g:
      np.testing.assert_array_equal(g[k], w[k])
  assert sum(float(b["weights"].sum()) for b in got) > 0


def test_resolve_corpora_builds_into_a_bucket_once(gcs, tmp_path, cache, monkeypatch):
  data = _bucket(gcs) + "/work/data"
  mixture = [
    {"kind": "corpus", "name": "code", "limit": 2, "weight": 0.5},
    {"kind": "jsonl", "path": "/elsewhere.jsonl"},
  ]
  resolved = corpus_build.resolve_corpora(mixture, data)
  assert resolved == [{"kind": "array_record", "path": f"{data}/code", "weight": 0.5}, mixture[1]]
  assert corpus_build.is_corpus(f"{data}/code")
  local = corpus_build.resolve_corpora(mixture, str(tmp_path / "data"))
  assert _records("array_record", f"{data}/code") == _records("array_record", local[0]["path"])
  assert len(_records("array_record", local[0]["path"])) == 2

  def no_build(*args, **kwargs):
    raise AssertionError("built again")

  monkeypatch.setattr(corpus_build, "_build", no_build)
  assert corpus_build.resolve_corpora(mixture, data) == resolved  # the manifest exists


def test_an_interrupted_build_leaves_no_manifest_in_the_bucket(gcs, cache, monkeypatch):
  bucket = _bucket(gcs)
  out = f"{bucket}/data/code"
  records = corpora.corpus_records

  def broken(name, limit=None):
    for i, record in enumerate(records(name, limit)):
      if i == 1:
        raise RuntimeError("killed mid-build")
      yield record

  monkeypatch.setattr(corpora, "corpus_records", broken)
  with pytest.raises(RuntimeError, match="killed"):
    corpus_build.build_corpus("code", out, limit=3)
  assert gcs.objects(_bucket_name(bucket)) == []  # the build was staged locally
  monkeypatch.setattr(corpora, "corpus_records", records)
  # Killed during the upload: the shards may be there, the manifest is not.
  copy = storage.copy_file
  _fail_after_one_copy(monkeypatch)
  with pytest.raises(ConnectionError):
    corpus_build.ensure_corpus("code", out, limit=3)
  assert gcs.objects(_bucket_name(bucket)) == ["data/code/code-00000-of-00001.array_record"]
  assert not corpus_build.is_corpus(out)
  monkeypatch.setattr(storage, "copy_file", copy)
  assert corpus_build.ensure_corpus("code", out, limit=3) == out  # a rerun completes it
  assert corpus_build.is_corpus(out) and len(_records("array_record", out)) == 3


def test_a_rebuild_replaces_the_corpus_in_the_bucket(gcs, cache):
  bucket = _bucket(gcs)
  out = f"{bucket}/c"
  corpus_build.build_corpus("code", out, limit=2, num_shards=2)
  corpus_build.build_corpus("code", out, limit=3)
  assert gcs.objects(_bucket_name(bucket)) == [
    "c/code-00000-of-00001.array_record",
    "c/manifest.json",
  ]
  assert len(_records("array_record", out)) == 3
  storage.write_text(f"{bucket}/other/notes.txt", "mine")
  with pytest.raises(ConfigError, match="not an empty folder or a corpus"):
    corpus_build.build_corpus("code", f"{bucket}/other", limit=2)
  assert gcs.objects(_bucket_name(bucket), "other/") == ["other/notes.txt"]


def test_tfds_corpus_in_a_bucket_reads_like_a_local_one(gcs, tmp_path, cache):
  out = _bucket(gcs) + "/tfds"
  manifest = corpus_build.build_corpus("code", out, limit=2, writer="tfds")
  local = corpus_build.build_corpus("code", str(tmp_path / "tfds"), limit=2, writer="tfds")
  assert manifest["path"].startswith(out + "/") and storage.isdir(manifest["path"])
  assert storage.read_json(storage.join(out, "manifest.json")) == manifest
  assert os.path.isdir(local["path"])  # the local path names the published folder too
  got = _records("tfds", manifest["path"])
  assert got == _records("tfds", local["path"]) and len(got) == 2


def _write_both(local_path, url, data: bytes):
  os.makedirs(os.path.dirname(local_path), exist_ok=True)
  with open(local_path, "wb") as f:
    f.write(data)
  storage.write_bytes(url, data)


def test_jsonl_source_in_a_bucket_reads_like_local(gcs, tmp_path, cache):
  bucket = _bucket(gcs)
  files = {
    "a.jsonl": b'{"text": "one"}\n{"text": "tw\xc3\xb6"}\r\n\n{"text": "last"}',
    "b.jsonl": b'{"text": "b"}\n',
    "skip.txt": b"not jsonl\n",
  }
  for name, data in files.items():
    _write_both(str(tmp_path / "j" / name), f"{bucket}/j/{name}", data)
  want = _records("jsonl", str(tmp_path / "j"))
  assert want == [
    b'{"text": "one"}',
    b'{"text": "tw\xc3\xb6"}',
    b"",
    b'{"text": "last"}',
    b'{"text": "b"}',
  ]
  assert _records("jsonl", f"{bucket}/j") == want
  assert _records("jsonl", f"{bucket}/j/*.jsonl") == want
  src = sources.make_source("jsonl", f"{bucket}/j/a.jsonl")
  for f in os.listdir(cache):  # a worker whose cached copy was evicted fetches it again
    os.unlink(os.path.join(cache, f))
  again = pickle.loads(pickle.dumps(src))
  assert [again[i] for i in range(len(again))] == want[:4]
  with pytest.raises(ConfigError, match="no .jsonl files match"):
    sources.make_source("jsonl", f"{bucket}/j/none-*.jsonl")
  with pytest.raises(ConfigError, match="cannot list"):
    sources.make_source("jsonl", "gs://no-such-bucket-cwm/j/*.jsonl")


def test_sources_larger_than_the_cache_are_a_config_error(gcs, cache, monkeypatch):
  out = _bucket(gcs) + "/c"
  corpus_build.build_corpus("code", out, limit=2, num_shards=2)
  sizes = sorted(len(storage.read_bytes(p)) for p in storage.glob(out + "/*.array_record"))
  assert len(sizes) == 2
  # Room for either shard, not for both.
  monkeypatch.setenv("CWM_CACHE_GB", str((sizes[1] + sizes[0] // 2) / 2**30))
  with pytest.raises(ConfigError, match="CWM_CACHE_GB"):
    sources.make_source("array_record", out)
  monkeypatch.setenv("CWM_CACHE_GB", str(2 * sum(sizes) / 2**30))
  assert len(sources.make_source("array_record", out)) == 2


def test_rl_task_files_in_a_bucket_read_like_local(gcs, tmp_path, cache):
  bucket = _bucket(gcs)
  lines = [
    json.dumps({"id": f"m{i}", "kind": "math", "prompt": f"{i}+1?", "answer": str(i + 1)})
    for i in range(8)
  ] + ['{"id": "bad"']
  data = "".join(line + "\n" for line in lines).encode()
  _write_both(str(tmp_path / "tasks" / "math.jsonl"), f"{bucket}/tasks/math.jsonl", data)
  tok = tokenizer_lib.Tokenizer.default()

  def take(paths):
    stream = datasets.TaskStream(paths, tok, max_prompt_len=4096, seed=5)
    tasks = stream.take(12)
    return [(t.name, t.prompt_ids) for t in tasks], dict(stream.bad)

  want = take([str(tmp_path / "tasks" / "math.jsonl")])
  assert len({name for (name, _) in want[0]}) == 8 and sum(want[1].values()) >= 1
  assert take([f"{bucket}/tasks/math.jsonl"]) == want
  assert take([f"{bucket}/tasks/*.jsonl"]) == want  # a JSONL glob
  assert take([f"{bucket}/tasks"]) == want  # a folder
  assert rl_trainer.task_paths(f"{bucket}/tasks/*.jsonl, math_set") == [
    f"{bucket}/tasks/*.jsonl",
    os.path.join(rl_trainer.TASK_SETS, "math_set.jsonl"),
  ]
  assert rl_trainer._matches(f"{bucket}/tasks/*.jsonl") == [f"{bucket}/tasks/math.jsonl"]
  assert rl_trainer._matches(f"{bucket}/tasks/none*.jsonl") == []
  assert rl_trainer._matches("gs://no-such-bucket-cwm/t/*.jsonl") == []


def test_user_inputs_of_a_trace_build_read_from_a_bucket(gcs, tmp_path):
  bucket = _bucket(gcs)
  prog = b"def sq(x):\n  return x * x\n"
  specs = (
    json.dumps({"path": "progs/sq.py", "function": "sq", "args": [3]})
    + "\r\n"
    + json.dumps({"source": "def inc(x):\n  return x + 1\n", "function": "inc", "args": [1]})
    + "\n"
  ).encode()
  evals = json.dumps({"source": "def g(a):\n  return a"}).encode() + b"\n"
  for rel, data in (
    ("in/progs/sq.py", prog),
    ("in/calls.jsonl", specs),
    ("eval/e.jsonl", evals),
    ("eval/py/deep/p.py", prog),
  ):
    _write_both(str(tmp_path.joinpath(*rel.split("/"))), f"{bucket}/{rel}", data)
  local = sources_functions.read_function_specs(str(tmp_path / "in" / "calls.jsonl"))
  got = sources_functions.read_function_specs(f"{bucket}/in/calls.jsonl")
  assert [(c.source, c.function, c.args) for c in got] == [
    (c.source, c.function, c.args) for c in local
  ]
  assert got[0].source == prog.decode() and got[0].origin == f"{bucket}/in/progs/sq.py"
  docs = dedup.read_eval_set([f"{bucket}/eval/e.jsonl", f"{bucket}/eval/py"])
  want = dedup.read_eval_set([str(tmp_path / "eval" / "e.jsonl"), str(tmp_path / "eval" / "py")])
  assert (
    sorted(docs.values())
    == sorted(want.values())
    == sorted(["def g(a):\n  return a", prog.decode()])
  )
  assert f"{bucket}/eval/py/deep/p.py" in docs
  with pytest.raises(ValueError, match="does not exist"):
    dedup.read_eval_set([f"{bucket}/eval/missing.jsonl"])
  tok = tokenizer_lib.Tokenizer.from_rank_file(_upload_ranks(bucket))
  text = "def f(x):\n    return x + 1  # ünïcode"
  assert tok.encode(text) == tokenizer_lib.Tokenizer.default().encode(text)


def _upload_ranks(bucket: str) -> str:
  url = f"{bucket}/ranks/cwm.tiktoken"
  storage.copy_file(tokenizer_lib.DEFAULT_RANK_FILE, url)
  return url


def test_train_refuses_a_bucket_it_cannot_write_before_compiling(gcs, tmp_path):
  """A missing bucket reads as an empty folder; the trainer probes a write first and
  exits 2 naming the fix, before any corpus, compile or checkpoint."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.train",
      "--config",
      os.path.join(root, "configs/smoke.py"),
      "--workdir",
      "gs://no-such-bucket-here/run",
    ],
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    ),
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "cannot write to gs://no-such-bucket-here/run" in out.stderr
  assert "bucket exists" in out.stderr
  assert os.listdir(tmp_path) == []
