"""Faults that must never crash a run: corrupt checkpoints on resume, a non-finite loss,
killed conversions, bad data records reaching the logs, special-token ids on export.

The reference is an uninterrupted 5-step run of a tiny model on one CPU device; a
resume that falls back past corrupt checkpoints must reproduce its losses exactly.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train_loop import _config as train_loop_config

from cwm_jax.base import ConfigError, NonFiniteError
from cwm_jax.checkpoint import conversion, manager
from cwm_jax.data import pipeline
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.infer import evaluation
from cwm_jax.model.config import tiny
from cwm_jax.model.transformer import model_from_params
from cwm_jax.train import health, lm, runtime, sources
from cwm_jax.train.metrics import MetricsWriter, progress_line
from cwm_jax.train.synthetic import SyntheticSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**fields):
  """The train-loop tests' small smoke config, checkpointing every step; `fields` are
  dotted overrides ('checkpoint.on_corrupt': 'fail')."""
  c = train_loop_config()
  c.checkpoint_every = 1
  c.checkpoint.update(dict(max_to_keep=10, async_save=False))
  for k, v in fields.items():
    section, _, key = k.rpartition(".")
    (c[section] if section else c)[key] = v
  return c


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _truncate_state(step_dir: str) -> None:
  """Halves every data file of a step's train state (a crash mid-copy, a full disk)."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  out = lm.train(_config(), workdir, devices=jax.devices()[:1])
  assert out["step"] == 5
  return workdir, [r["loss"] for r in _records(workdir)]


def test_resume_falls_back_past_corrupt_and_uncommitted_checkpoints(reference, tmp_path):
  ref_dir, ref_losses = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  _truncate_state(os.path.join(ckpts, "5"))
  _truncate_state(os.path.join(ckpts, "4"))
  os.makedirs(os.path.join(ckpts, "70"))  # a save that never committed
  assert manager.complete_steps(ckpts) == [1, 2, 3, 4, 5]

  out = lm.train(_config(), workdir, devices=jax.devices()[:1])
  assert out["step"] == 5
  records = _records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  # Resumed from step 3 (the newest that restores): steps 4 and 5 are bit-identical.
  np.testing.assert_array_equal([r["loss"] for r in records], ref_losses)
  set_aside = sorted(n for n in os.listdir(ckpts) if ".bad-" in n)
  assert [n.split(".")[0] for n in set_aside] == ["4", "5", "70"]
  assert manager.complete_steps(ckpts) == [1, 2, 3, 4, 5]


def test_resume_with_on_corrupt_fail_names_the_checkpoint(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  _truncate_state(os.path.join(workdir, "checkpoints", "5"))
  with pytest.raises(ConfigError, match=r"checkpoints/5 is corrupt.*on_corrupt=fail"):
    lm.train(_config(**{"checkpoint.on_corrupt": "fail"}), workdir, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == list("12345")


def test_rejected_init_from_creates_nothing(tmp_path):
  workdir, missing = str(tmp_path / "w"), str(tmp_path / "no_such_run")
  with pytest.raises(ConfigError, match="init_from.path"):
    lm.train(_config(**{"init_from.path": missing}), workdir, devices=jax.devices()[:1])
  assert not os.path.exists(workdir) and not os.path.exists(missing)


def _nan_source(at_index):
  """Synthetic batches whose loss weights are NaN at batch `at_index` (a poisoned batch)."""

  def factory(config, model_cfg, process_index, process_count):
    src = sources.SOURCES["synthetic"](config, model_cfg, process_index, process_count)

    class Poisoned(SyntheticSource):
      def __next__(self):
        index = self._index
        batch = SyntheticSource.__next__(self)
        if index == at_index:
          batch["weights"] = np.full_like(batch["weights"], np.nan)
        return batch

    src.__class__ = Poisoned
    return src

  return factory


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "nan_at_3", _nan_source(3))
  workdir = str(tmp_path / "run")
  config = _config(**{"data.source": "nan_at_3", "checkpoint_every": 2})
  with pytest.raises(
    NonFiniteError,
    match=r"step 4: non-finite loss=nan.*last good "
    r"checkpoint is step 2",
  ) as e:
    lm.train(config, workdir, devices=jax.devices()[:1])
  assert e.value.exit_code == 3
  assert manager.complete_steps(os.path.join(workdir, "checkpoints")) == [2]
  records = _records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert math.isnan(records[-1]["loss"]) and records[-1]["nonfinite_steps"] == 1
  np.testing.assert_array_equal([r["loss"] for r in records[:3]], reference[1][:3])


def test_skip_nonfinite_skips_the_update(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "nan_at_2", _nan_source(2))
  workdir = str(tmp_path / "run")
  config = _config(
    **{"data.source": "nan_at_2", "optimizer.skip_nonfinite": 2, "checkpoint_every": 0}
  )
  out = lm.train(config, workdir, devices=jax.devices()[:1])
  assert out["step"] == 5
  records = _records(workdir)
  assert math.isnan(records[2]["loss"]) and records[-1]["nonfinite_steps"] == 1
  assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
  _, params = manager.restore_params(os.path.join(workdir, "checkpoints"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_error_exits_3_with_one_line():
  code = (
    "from cwm_jax.cli import run_main\nfrom cwm_jax.base import NonFiniteError\n"
    "def main(argv):\n  raise NonFiniteError('step 7: non-finite loss=nan')\n"
    "run_main(main)\n"
  )
  p = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
  )
  assert p.returncode == 3
  assert p.stderr.strip().splitlines() == ["error: step 7: non-finite loss=nan"]


def test_bad_record_counts_reach_metrics_and_progress_line(tmp_path):
  lines = [
    b'{"text": "fine words"}',
    b"[" * 50_000,
    b'{"text": 5}',
    b"\xff",
    b"",
    b'{"text": "more fine words"}',
  ]
  path = tmp_path / "c.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  cfg = pipeline.default_data_config().to_dict()
  cfg.update(mixture=[{"kind": "jsonl", "path": str(path)}], num_epochs=1, read_threads=1)
  it = pipeline.make_iterator(cfg, seq_len=16, global_batch=1)
  list(it)
  writer = MetricsWriter(str(tmp_path / "w"), tensorboard=False, total_steps=9)
  log = runtime._Logger(writer, 0.0, 0, health.Guard(0, None), it)  # pylint: disable=protected-access
  log.defer(1, {"loss": np.float32(2.0), "grad_norm": np.float32(1.0)})
  log.flush()
  record = _records(str(tmp_path / "w"))[0]
  assert record["bad_records"] == 4
  assert record["bad_records/schema"] == 2 and record["bad_records/invalid_utf8"] == 1
  assert record["bad_records/empty"] == 1
  assert "bad records 4" in progress_line(record, 9)


def test_conversion_sweeps_partials_of_dead_processes(tmp_path):
  cfg = tiny(n_layers=1, vocab_size=512)
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), manager.params_target(cfg))
  src = str(tmp_path / "orb")
  manager.save_params_checkpoint(src, cfg, params)
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  stale, live = tmp_path / f".hf.partial-{dead}", tmp_path / f".hf.partial-{os.getppid()}"
  stale.mkdir()
  live.mkdir()
  conversion.convert(src, str(tmp_path / "hf"), "hf")
  assert not stale.exists() and live.exists()
  with open(tmp_path / "hf" / "config.json") as f:
    hf_config = json.load(f)
  # The project BPE (4352 ids) does not fit a 512-token vocabulary: no ids are exported.
  assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(hf_config)


def test_exported_special_token_ids_come_from_the_model_tokenizer(tmp_path):
  tok = Tokenizer.default()
  cfg = tiny(n_layers=1, vocab_size=tok.vocab_size)
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), manager.params_target(cfg))
  src = str(tmp_path / "orb")
  manager.save_params_checkpoint(src, cfg, params)
  conversion.convert(src, str(tmp_path / "hf"), "hf")
  with open(tmp_path / "hf" / "config.json") as f:
    hf_config = json.load(f)
  assert hf_config["bos_token_id"] == tok.bos_id == 4096
  assert hf_config["eos_token_id"] == list(tok.stop_ids)
  assert hf_config["pad_token_id"] == tok.special_id("<|pad|>")
  assert max([hf_config["bos_token_id"], *hf_config["eos_token_id"]]) < cfg.vocab_size


def test_evaluation_never_reports_a_metric_over_nothing():
  """A budget shorter than every trace prompt scores no token: NaN and a count of 0,
  not the perfect-looking NLL 0.0 / perplexity 1.0 of before."""
  tok = Tokenizer.default()
  cfg = tiny(n_layers=1, vocab_size=tok.vocab_size)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32), manager.params_target(cfg)
  )
  model = model_from_params(cfg, params)
  config = evaluation.EvalConfig(
    max_programs=1,
    max_tokens=4,
    generate=False,
    records={
      "code": [{"text": "def f(x):\n  return x\n"}],
      "empty": [{"format": "chat", "messages": [{"role": "user", "content": "hi"}]}],
    },
  )
  m = evaluation.evaluate(model, tok, config)
  assert m["trace_cases"] == 1 and m["trace_tokens"] == 0
  assert math.isnan(m["trace_nll"]) and math.isnan(m["trace_token_accuracy"])
  assert m["tokens_code"] == 3 and math.isfinite(m["ppl_code"])  # 4 tokens -> 3 predictions
  assert m["tokens_empty"] == 0 and math.isnan(m["ppl_empty"])  # no assistant token
  assert evaluation.unscored(m) == ["nll_empty", "ppl_empty", "trace_nll", "trace_token_accuracy"]


def test_cli_fallback_past_a_truncated_checkpoint_is_one_warning_line(reference, tmp_path):
  """The program, not the library: resuming past a checkpoint whose array data files were
  truncated prints one warning line about it and no traceback, then finishes (exit 0)."""
  from test_train_loop import FLAGS as TRAIN_FLAGS
  from test_train_loop import _env

  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  _truncate_state(os.path.join(workdir, "checkpoints", "5"))
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.train",
      "--config",
      os.path.join(ROOT, "configs/smoke.py"),
      "--workdir",
      workdir,
      *TRAIN_FLAGS,
      "--config.checkpoint_every=1",
      "--config.checkpoint.max_to_keep=10",
      "--config.checkpoint.async_save=False",
      "--config.mesh.fsdp=1",
      "--config.compiler_options.xla_backend_optimization_level=0",
    ],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  warned = [l for l in run.stderr.splitlines() if "is corrupt or incomplete" in l]
  assert len(warned) == 1 and "trying the previous checkpoint" in warned[0], run.stderr[-3000:]
  assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr
  assert "resuming from" in run.stderr and "step 4" in run.stderr


def test_asyncio_reports_of_failed_orbax_restores_are_dropped_and_others_kept():
  """After a restore fails on a corrupt checkpoint, asyncio reports orbax's abandoned tasks
  when they are collected (often at exit, so no run can be asserted on): those reports are
  dropped, any other asyncio error is kept."""
  import logging  # pylint: disable=g-import-not-at-top

  noise = manager._RestoreNoise()  # pylint: disable=protected-access
  record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
  assert not noise.filter(
    record(
      "Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() "
      "defined at .../orbax/checkpoint/_src/serialization/serialization.py:394>>"
    )
  )
  assert noise.filter(record("Task exception was never retrieved\nfuture: <Task coro=<mine()>>"))
  assert noise.filter(record("orbax: something else went wrong"))
