"""The README's main job, shortened: pretrain -> midtrain -> sft on the embedded corpora."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
from test_launch import ROOT

from cwm_jax.checkpoint.load import load_params
from cwm_jax.checkpoint.manager import restore_params
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.train import sources
from cwm_jax.train.config import model_config

STEPS = dict(pretrain=16, midtrain=8, sft=12)


def _records(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _run_main_job(workdir):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  steps = [f"--config.schedule.stages.{k}.steps={v}" for k, v in STEPS.items()]
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.train",
      "--config",
      "configs/smoke.py:schedule=all,corpus_limit=4",
      "--workdir",
      str(workdir),
      "--config.checkpoint_every=8",
      "--config.schedule.sample_tokens=8",
      "--config.compiler_options.xla_backend_optimization_level=0",
      *steps,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )


def _prompt_answer_segments(batch, header):
  """(weights, expected) of each packed piece holding the assistant header: the targets up to
  the end of the header are prompt (0), the rest is the answer (1)."""
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in set(seg.tolist()) - {0}:
      idx = np.flatnonzero(seg == s)
      ids = batch["inputs"][b, idx].tolist() + [int(batch["targets"][b, idx[-1]])]
      starts = [i for i in range(len(ids)) if ids[i : i + len(header)] == header]
      if starts:  # target j predicts ids[j + 1]
        answer = np.arange(1, len(ids)) >= starts[0] + len(header)
        yield batch["weights"][b, idx], answer.astype(np.float32)


def test_main_job_trains_every_stage_on_the_corpora(tmp_path):
  run = _run_main_job(tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  for corpus in ("code", "traces", "sft"):
    with open(tmp_path / "data" / corpus / "manifest.json") as f:
      assert json.load(f)["records"] > 0
  losses = {s: [r["loss"] for r in _records(tmp_path, s)] for s in STEPS}
  for stage, loss in losses.items():
    assert len(loss) == STEPS[stage] and all(map(math.isfinite, loss)), (stage, loss)
    assert np.mean(loss[-3:]) < np.mean(loss[:3]), (stage, loss)
  assert losses["pretrain"][0] > math.log(4352) - 0.5  # starts near uniform over the vocab
  assert losses["sft"][-1] < losses["pretrain"][0] - 1.0

  # The SFT stage's own data config (saved with its checkpoint) reads the built corpus.
  with open(tmp_path / "sft" / "checkpoints" / "12" / "meta" / "metadata") as f:
    sft = ml_collections.ConfigDict(json.load(f)["config"])
  assert sft.data.mixture == [
    {"kind": "array_record", "path": str(tmp_path / "data" / "sft"), "weight": 1.0}
  ]
  tok = Tokenizer.default()
  it = sources.make_source(sft, model_config(sft), 0, 1)
  batch = next(it)
  real = batch["segment_ids"] > 0
  assert batch["weights"][real].min() == 0 and batch["weights"][real].max() == 1
  pieces = [p for _ in range(4) for p in _prompt_answer_segments(next(it), tok.header("assistant"))]
  assert pieces
  for weights, expected in pieces:  # prompt tokens are out of the loss, answer tokens in
    np.testing.assert_array_equal(weights, expected)

  # The Hugging Face export holds the final SFT weights.
  cfg, params = load_params(str(tmp_path / "hf"))
  ours_cfg, ours = restore_params(str(tmp_path / "sft" / "checkpoints"))
  assert cfg.vocab_size == ours_cfg.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(
    np.asarray(params["embed"]["embedding"]), np.asarray(ours["embed"]["embedding"])
  )
  with open(tmp_path / "finish.json") as f:
    assert isinstance(json.load(f)["sample"]["text"], str)

  # The trained model beats an untrained one on the held-out trace eval (teacher-forced).
  from cwm_jax.infer.evaluation import EvalConfig, evaluate
  from cwm_jax.model import init_model, model_from_params

  eval_cfg = EvalConfig(max_programs=2, max_tokens=512, generate=False, perplexity=False)
  trained = evaluate(model_from_params(cfg, params), tok, eval_cfg)
  untrained = evaluate(init_model(cfg, seed=0), tok, eval_cfg)
  assert trained["trace_nll"] < untrained["trace_nll"] - 1.0, (trained, untrained)
