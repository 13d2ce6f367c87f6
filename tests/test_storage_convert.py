"""Checkpoint conversion and program outputs on gs:// (the local GCS emulator).

The reference for every gs:// result is the same work done on local paths: a
conversion into a bucket must produce the very bytes the local conversion
writes, read back through the same readers, and a failed or refused conversion
must leave nothing at the destination that a reader would accept.
"""

import io
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch
from test_convert import REPO, TOKENS, _bits, _hf_checkpoint, _torch_logits

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint import conversion as cv
from cwm_jax.checkpoint import hf, manager, meta
from cwm_jax.checkpoint.load import load_model
from cwm_jax.data.tokenizer import DEFAULT_RANK_FILE
from cwm_jax.infer import loading
from cwm_jax.recipe import grids

SHARD = 150_000  # bytes: several safetensors shards for the tiny model


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
  """Objects read from the bucket are cached under the test's folder, not ~/.cache."""
  monkeypatch.setenv("CWM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  """The local reference: HF float32 -> orbax -> HF (sharded) and -> Meta."""
  d = tmp_path_factory.mktemp("local")
  paths = {k: str(d / k) for k in ("hf", "orbax", "hf2", "meta")}
  model = _hf_checkpoint(paths["hf"], "float32")
  cv.convert(paths["hf"], paths["orbax"], "orbax")
  cv.convert(paths["orbax"], paths["hf2"], "hf", max_shard_bytes=SHARD)
  cv.convert(paths["orbax"], paths["meta"], "meta")
  return paths, model


def _files(directory):
  """{relative path: bytes} of every file under a local folder or a URL."""
  if storage.is_url(directory):
    fs, root = fsspec.core.url_to_fs(directory)
    return {key[len(root) + 1 :]: fs.cat_file(key) for key in fs.find(root)}
  out = {}
  for d, _, files in os.walk(directory):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), directory).replace(os.sep, "/")
      out[rel] = storage.read_bytes(os.path.join(d, f))
  return out


def _logits(directory):
  _, model = load_model(directory)
  return np.asarray(model(TOKENS))


def _recording_copies(monkeypatch):
  """Every storage.copy_file destination, in order."""
  copied, copy = [], storage.copy_file

  def record(src, dst):
    copy(src, dst)
    copied.append(str(dst))

  monkeypatch.setattr(storage, "copy_file", record)
  return copied


def test_hf_to_orbax_to_hf_through_a_bucket_is_the_local_conversion(gcs, local, monkeypatch):
  paths, model = local
  bucket = gcs.bucket("convert-hf-roundtrip")
  orb, out = f"{bucket}/run/orbax", f"{bucket}/export/hf"
  copied = _recording_copies(monkeypatch)
  summary = cv.convert(paths["hf"], orb, "orbax")
  assert summary["dst"] == orb and summary["step"] == 0
  # The commit file orbax readers trust arrives after everything else.
  assert copied[-1] == f"{orb}/0/{manager.COMMIT_FILE}" and len(copied) > 10
  copied.clear()
  cv.convert(orb, out, "hf", max_shard_bytes=SHARD)
  assert copied[-1] == f"{out}/config.json"

  ours, ref = _files(out), _files(paths["hf2"])
  assert sorted(ours) == sorted(ref) and sum(n.endswith(".safetensors") for n in ours) > 2
  for name in ref:
    assert ours[name] == ref[name], name  # every shard, the index, config and tokenizer
  assert sorted(gcs.objects("convert-hf-roundtrip", "export/hf/")) == sorted(
    f"export/hf/{n}" for n in ref
  )

  # Read back from the bucket: the tensors are the source's, bit for bit.
  src, back = hf.SafetensorsReader(paths["hf"]), hf.SafetensorsReader(out)
  assert src.names() == back.names()
  for name in src.names():
    assert np.array_equal(_bits(src.get(name)), _bits(back.get(name))), name
  # ...and the models read from the bucket compute what transformers computes.
  theirs = _torch_logits(model)
  np.testing.assert_array_equal(_logits(orb), _logits(paths["orbax"]))
  np.testing.assert_array_equal(_logits(out), _logits(paths["hf2"]))
  np.testing.assert_allclose(_logits(out), theirs, atol=1e-4, rtol=0)

  # A bucket checkpoint converts back to a local one equal to the local export.
  again = str(os.path.join(os.path.dirname(paths["hf"]), "from-bucket"))
  cv.convert(out, again, "hf", max_shard_bytes=SHARD)
  assert _files(again) == ref


def test_meta_export_to_a_bucket_and_back(gcs, local, tmp_path):
  paths, model = local
  bucket = gcs.bucket("convert-meta")
  out = f"{bucket}/meta"
  cv.convert(paths["orbax"], out, "meta")
  ours, ref = _files(out), _files(paths["meta"])
  assert sorted(ours) == sorted(ref) and any(n.endswith(".distcp") for n in ref)
  # DCP's .metadata carries a fresh save id; the tensor files and params.json are equal.
  for name in ref:
    if name != ".metadata":
      assert ours[name] == ref[name], name
  a, b = meta.DcpReader(paths["meta"]), meta.DcpReader(out)
  assert a.names() == b.names()
  for name in a.names():
    assert a.shape(name) == b.shape(name) and a.dtype(name) == b.dtype(name)
    assert np.array_equal(_bits(a.get(name)), _bits(b.get(name))), name
  # Meta read from the bucket into a local orbax checkpoint gives the HF model's logits.
  orb = str(tmp_path / "orbax")
  cv.convert(out, orb, "orbax")
  np.testing.assert_allclose(_logits(orb), _torch_logits(model), atol=1e-4, rtol=0)


def test_damaged_bucket_checkpoints_are_named_errors(gcs, local):
  paths, _ = local
  bucket = gcs.bucket("convert-damaged")
  storage.upload_tree(paths["meta"], f"{bucket}/meta")
  gone = sorted(n for n in os.listdir(paths["meta"]) if n.endswith(".distcp"))[3]
  storage.remove(f"{bucket}/meta/{gone}")
  with pytest.raises(ConfigError, match=f"DCP checkpoint file {bucket}/meta/{gone} is missing"):
    cv.open_source(f"{bucket}/meta")
  storage.upload_tree(paths["hf2"], f"{bucket}/hf")
  shard = sorted(n for n in os.listdir(paths["hf2"]) if n.endswith(".safetensors"))[1]
  data = storage.read_bytes(os.path.join(paths["hf2"], shard))
  storage.write_bytes(f"{bucket}/hf/{shard}", data[: len(data) // 2])
  with pytest.raises(
    ConfigError,
    match=f"safetensors file {bucket}/hf/{shard} is corrupt: .* the file is truncated or damaged",
  ):
    cv.open_source(f"{bucket}/hf")


@pytest.mark.parametrize("to", ["hf", "orbax"])
def test_a_failed_conversion_leaves_no_checkpoint_in_the_bucket(gcs, local, monkeypatch, to):
  paths, _ = local
  name = f"convert-fails-{to}"
  bucket = gcs.bucket(name)
  src = paths["orbax"] if to == "hf" else paths["hf"]

  # Failing while tensors are written: nothing reaches the bucket.
  count = cv._Counter.__call__  # pylint: disable=protected-access

  def failing(self, x):
    if self.tensors >= 4:
      raise OSError("disk full")
    return count(self, x)

  with monkeypatch.context() as m:
    m.setattr(cv._Counter, "__call__", failing)  # pylint: disable=protected-access
    with pytest.raises(OSError, match="disk full"):
      cv.convert(src, f"{bucket}/a", to, max_shard_bytes=SHARD)
  assert gcs.objects(name) == []

  # Failing midway through the upload: some objects, but never the marker readers need.
  copy, calls = storage.copy_file, []

  def failing_copy(s, d):
    if storage.is_url(d):  # uploads only (tokenizer files are copied into staging too)
      calls.append(d)
      if len(calls) == 4:
        raise OSError("connection reset")
    copy(s, d)

  with monkeypatch.context() as m:
    m.setattr(storage, "copy_file", failing_copy)
    with pytest.raises(OSError, match="connection reset"):
      cv.convert(src, f"{bucket}/b", to, max_shard_bytes=SHARD)
  left = gcs.objects(name)
  assert len(left) == 3 and all(o.startswith("b/") for o in left)
  assert f"b/{cv.marker(to)}" not in left
  with pytest.raises(ConfigError):
    cv.open_source(f"{bucket}/b")
  # The partial upload is not overwritten by a retry; the error names the fix.
  with pytest.raises(ConfigError, match="exists and is not empty; choose a new directory"):
    cv.convert(src, f"{bucket}/b", to)
  assert gcs.objects(name) == left


def test_converting_into_a_non_empty_bucket_folder_is_refused(gcs, local):
  paths, _ = local
  bucket = gcs.bucket("convert-non-empty")
  storage.write_text(f"{bucket}/out/keep.txt", "x")
  for to, src in (("hf", paths["orbax"]), ("orbax", paths["hf"]), ("meta", paths["orbax"])):
    with pytest.raises(ConfigError, match="exists and is not empty"):
      cv.convert(src, f"{bucket}/out", to)
  with pytest.raises(ConfigError, match="must be outside the source"):
    cv.convert(f"{bucket}/out", f"{bucket}/out/inner", "hf")
  assert gcs.objects("convert-non-empty") == ["out/keep.txt"]


def test_tokenizer_rank_file_beside_a_bucket_checkpoint(gcs, local, tmp_path):
  paths, _ = local
  bucket = gcs.bucket("convert-tokenizer")
  storage.upload_tree(paths["hf2"], f"{bucket}/run/hf")
  storage.copy_file(DEFAULT_RANK_FILE, f"{bucket}/run/tokenizer.model")
  assert loading.find_rank_file(f"{bucket}/run/hf") == f"{bucket}/run/tokenizer.model"
  assert loading.find_rank_file(bucket) is None  # a bucket's root has no parent to search
  tok = loading.load_tokenizer(f"{bucket}/run/hf")
  ref = loading.load_tokenizer(paths["hf2"], DEFAULT_RANK_FILE)
  text = "def add(a, b):\n  return a + b\n"
  assert tok.encode(text, bos=True) == ref.encode(text, bos=True)
  assert tok.vocab_size == ref.vocab_size


def _program(module, *args):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_score_reads_and_writes_the_bucket_like_local_paths(gcs, local, tmp_path):
  paths, model = local
  bucket = gcs.bucket("score-output")
  storage.upload_tree(paths["hf2"], f"{bucket}/ckpt")
  ids = "5,17,9,200,3,3,42,7,100,11"
  ref = tmp_path / "lp.npy"
  r = _program(
    "cwm_jax.score", f"--checkpoint={paths['hf2']}", f"--token_ids={ids}", f"--output={ref}"
  )
  assert r.returncode == 0, r.stderr[-2000:]
  r = _program(
    "cwm_jax.score",
    f"--checkpoint={bucket}/ckpt",
    f"--token_ids={ids}",
    f"--output={bucket}/scores/lp",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"to {bucket}/scores/lp.npy" in r.stdout
  assert "scores/lp.npy" in gcs.objects("score-output", "scores/")
  data = storage.read_bytes(f"{bucket}/scores/lp.npy")
  assert data == ref.read_bytes()
  lp = np.load(ref)
  tokens = [int(t) for t in ids.split(",")]
  with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([tokens])).logits.double(), -1)[0]
  expected = logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()
  np.testing.assert_allclose(lp, expected, atol=1e-4)
  r = _program(
    "cwm_jax.score", f"--checkpoint={bucket}/ckpt", f"--token_ids={ids}", f"--output={bucket}/ckpt"
  )
  assert r.returncode == 2 and "must be a file path" in r.stderr


def test_sweep_with_a_bucket_workdir_launches_runs_there(gcs, tmp_path, monkeypatch):
  bucket = gcs.bucket("sweep-workdir")
  launched = []
  monkeypatch.setattr(grids.subprocess, "run", lambda cmd, check: launched.append(cmd))
  monkeypatch.chdir(tmp_path)  # where a local folder named 'gs:' would appear
  config = os.path.join(REPO, "configs", "smoke.py")
  sweep = os.path.join(REPO, "configs", "sweeps", "smoke_lr.py")
  commands = grids.run_sweep(config, sweep, "local", f"{bucket}/sweeps", out=io.StringIO())
  local = grids.run_sweep(config, sweep, "local", str(tmp_path / "sweeps"), out=io.StringIO())
  assert launched == commands + local and len(commands) > 1
  for cmd, ref in zip(commands, local):
    workdir = next(a for a in cmd if a.startswith("--workdir="))[len("--workdir=") :]
    name = storage.basename(workdir)
    assert workdir == f"{bucket}/sweeps/{name}"
    assert ref == [a.replace(f"{bucket}/sweeps", str(tmp_path / "sweeps")) for a in cmd]
    assert os.path.isdir(tmp_path / "sweeps" / name)
  assert sorted(os.listdir(tmp_path)) == ["sweeps"]
