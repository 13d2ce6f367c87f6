"""In-training evaluation: `eval_every` logs `eval/*` records next to the loss."""

import json

import jax
import numpy as np
import pytest

from cwm_jax.base import ConfigError
from cwm_jax.recipe import trainers
from cwm_jax.train import config as config_lib
from cwm_jax.train import lm


def _config(**kw):
  c = config_lib.base_config()
  c.total_steps, c.checkpoint_every, c.seq_len, c.batch_size = 2, 0, 32, 4
  c.metrics.tensorboard = False
  c.optimizer.decay_steps = 2
  c.model.overrides.update(vocab_size=4352, n_layers=2)  # the shipped tokenizer's vocab
  c.compiler_options.xla_backend_optimization_level = 0
  c.eval_every = 2
  c.eval.update(max_programs=1, max_new_tokens=8, max_tokens=1024, generate=False)
  c.update(kw)
  return c


def test_eval_every_logs_eval_records(tmp_path):
  c = _config()
  out = lm.train(c, str(tmp_path), devices=jax.devices()[:1], hooks=[trainers.evaluation_hook(c)])
  assert out["step"] == 2
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in records if "eval/trace_nll" in r]
  assert [r["step"] for r in evals] == [2]
  ev = evals[0]
  # An untrained model over a 4352-token vocabulary is close to uniform: nll ~ log(4352).
  assert abs(ev["eval/trace_nll"] - np.log(4352)) < 1.0
  for source in ("code", "traces", "sft"):
    assert np.isfinite(ev[f"eval/nll_{source}"]) and ev[f"eval/tokens_{source}"] > 0
  assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_bad_eval_config_fails_before_training(tmp_path):
  c = _config(batch_size=8)  # validated against all 8 test devices
  c.eval.max_programs = 0
  with pytest.raises(ConfigError, match="max_programs"):
    trainers.TRAINERS["lm"].validate(c)
  assert not (tmp_path / "metrics.jsonl").exists()
