"""Exports during training: `export.every` writes WORKDIR/hf/step_N from that step's committed
checkpoint, in a background thread, loadable by transformers; bad values fail validation."""

import json
import os
import threading

import numpy as np
import pytest

from cwm_jax.base import ConfigError
from cwm_jax.checkpoint import hf, manager
from cwm_jax.recipe import trainers
from cwm_jax.train import config as config_lib


def _config(**kw):
  c = config_lib.base_config()
  c.total_steps, c.checkpoint_every, c.seq_len, c.batch_size = 4, 2, 32, 8  # 8 test devices
  c.metrics.tensorboard = False
  c.optimizer.decay_steps = 4
  c.model.overrides.update(vocab_size=4352, n_layers=2)  # the shipped tokenizer's vocab
  c.compiler_options.xla_backend_optimization_level = 0
  c.checkpoint.max_to_keep = 5
  c.export.every = 2
  c.update(kw)
  return c


def test_export_every_writes_loadable_exports(tmp_path, monkeypatch):
  """Steps 2 and 4 are exported; the hook returns while the export of its step is still
  blocked (it never runs on the step's path); each export holds that step's weights."""
  transformers = pytest.importorskip("transformers")
  release = threading.Event()
  real = trainers.convert
  started = []

  def gated(src, dst, to, **kw):
    started.append(kw["step"])
    assert release.wait(300)
    return real(src, dst, to, **kw)

  monkeypatch.setattr(trainers, "convert", gated)
  seen = []
  real_hook = trainers.ExportHook.__call__

  def watch(self, ctx):
    out = real_hook(self, ctx)
    seen.append((ctx.step, list(self.done)))
    if ctx.step == 4:
      release.set()  # the exports were waiting all along: training was not
    return out

  monkeypatch.setattr(trainers.ExportHook, "__call__", watch)
  c = _config()
  out = trainers.TRAINERS["lm"].run(c, str(tmp_path), [])
  assert out["step"] == 4
  assert [step for step, done in seen] == [1, 2, 3, 4] and all(not d for _, d in seen)
  assert sorted(started) == [2, 4]
  assert [(e["step"], "error" in e) for e in out["exports"]] == [(2, False), (4, False)]
  for step in (2, 4):
    d = tmp_path / "hf" / f"step_{step}"
    assert {
      "config.json",
      "tokenizer.json",
      "tokenizer_config.json",
      "generation_config.json",
    } <= set(os.listdir(d))
    _, params = manager.restore_params(str(tmp_path / "checkpoints"), step)
    head = hf.SafetensorsReader(str(d)).get("lm_head.weight")
    np.testing.assert_array_equal(head.T, np.asarray(params["lm_head"]))
  tk = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf" / "step_4"))
  assert tk("def f(x):\n  return x").input_ids[0] == 4096
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf" / "step_4"))
  assert model.config.vocab_size == 4352


def test_finished_export_is_logged_at_a_later_step(tmp_path, monkeypatch):
  hooks = {}
  real = trainers.export_hook

  def capture(config, workdir):
    hooks["export"] = real(config, workdir)
    return hooks["export"]

  def wait_for_step_2(ctx):  # runs before the trainer's own hooks at each step
    if ctx.step == 3:
      hooks["export"].threads[0].join(300)
    return None

  monkeypatch.setattr(trainers, "export_hook", capture)
  trainers.TRAINERS["lm"].run(_config(), str(tmp_path), [wait_for_step_2])
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["export/step"]) for r in records if "export/step" in r] == [(3, 2.0)]


@pytest.mark.parametrize(
  "every, ckpt, match",
  [
    (3, 2, "must be a multiple of checkpoint_every=2.*export.every=4"),
    (-1, 2, "must be an integer >= 0"),
    (2, 0, "needs checkpoints every N steps"),
  ],
)
def test_bad_export_every_is_a_config_error(every, ckpt, match):
  c = _config(checkpoint_every=ckpt)
  c.export.every = every
  with pytest.raises(ConfigError, match=match):
    trainers.TRAINERS["lm"].validate(c)
