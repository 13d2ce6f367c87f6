"""Stage schedules: stage configs, the cwm_32b recipe, and a killed-and-resumed smoke run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import optax
import pytest
from test_launch import ROOT

from cwm_jax.base import ConfigError
from cwm_jax.data.pipeline import DataConfig
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.model.config import cwm_32b
from cwm_jax.recipe import grids, schedule, stages
from cwm_jax.train.config import execution_config, model_config


def smoke(arg="schedule=all,source=synthetic"):  # the 20-step plumbing schedule
  return grids.parse_config(f"configs/smoke.py:{arg}")


def test_smoke_stage_configs():
  c = smoke()
  pre, mid, sft = (stages.stage_config(c, i, "/w") for i in range(3))
  # Steps are absolute; pre->mid share one LR schedule ending at mid's last step.
  assert (pre.total_steps, mid.total_steps, sft.total_steps) == (8, 14, 6)
  assert pre.optimizer.decay_steps == mid.optimizer.decay_steps == 14
  assert sft.optimizer.decay_steps == 6 and sft.optimizer.lr == 1e-3
  assert (pre.seq_len, mid.seq_len, sft.seq_len) == (64, 128, 96)
  m_pre, m_mid = model_config(pre), model_config(mid)
  assert m_pre.rope_scaling is None and m_mid.rope_scaling is not None
  assert m_pre.layer_windows == (64, 16, 16, 64) and m_mid.layer_windows == (128, 16, 16, 128)
  assert dict(pre.mesh)["fsdp"] == -1 and dict(mid.mesh)["data"] == -1  # stages reshard
  assert not pre.init_from.path
  assert (mid.init_from.path, mid.init_from.step, mid.init_from.params_only) == (
    "/w/pretrain/checkpoints",
    8,
    False,
  )
  assert (sft.init_from.path, sft.init_from.step, sft.init_from.params_only) == (
    "/w/midtrain/checkpoints",
    14,
    True,
  )
  assert sft.data.prompt_fraction == 0.5 and pre.data.prompt_fraction == 0.0
  only = smoke("stage=midtrain,source=synthetic")
  assert [s.name for s in stages.selected(only, stages.stages_from_config(only))] == ["midtrain"]


def test_smoke_schedule_reads_the_embedded_corpora(tmp_path):
  c = smoke("schedule=all")
  pre, mid, sft = (stages.stage_config(c, i, str(tmp_path)) for i in range(3))
  assert model_config(pre).vocab_size == Tokenizer.default().vocab_size == 4352
  kinds = lambda sc: [(m["kind"], m["name"]) for m in sc.data.mixture]
  assert kinds(pre) == [("corpus", "code")]
  assert kinds(mid) == [("corpus", "traces"), ("corpus", "code")]
  assert kinds(sft) == [("corpus", "sft")]
  assert pre.data.source == "grain" and pre.data.long_documents == "split"
  # A corpus whose manifest exists is not rebuilt: the entry just points at its folder.
  os.makedirs(tmp_path / "data" / "code")
  (tmp_path / "data" / "code" / "manifest.json").write_text("{}")
  resolved = schedule.with_corpora(pre, str(tmp_path))
  assert resolved.data.mixture == [
    {"kind": "array_record", "path": str(tmp_path / "data" / "code"), "weight": 1.0}
  ]
  with pytest.raises(ConfigError, match="must be one of"):
    with c.unlocked():
      c.schedule.only = "sft"
      c.schedule.stages.sft.data.mixture = [{"kind": "corpus", "name": "novels"}]
    schedule.prepare_data(c, str(tmp_path))


def test_bad_stage_definitions_are_config_errors():
  c = smoke()
  with c.unlocked():
    c.schedule.stages.midtrain.optimizer = {"lr": 1.0}
  with pytest.raises(ConfigError, match="carries the optimizer"):
    stages.stages_from_config(c)
  c = smoke()
  c.schedule.stages.pretrain.start_from = "previous"
  with pytest.raises(ConfigError, match="no previous stage"):
    stages.stages_from_config(c)
  c = smoke()
  with c.unlocked():
    c.schedule.stages.sft.execution = {"remat": "dots"}  # the field is remat_policy
  with pytest.raises(ConfigError, match="remat"):
    execution_config(stages.stage_config(c, 2, "/w"))
  c = smoke()
  c.schedule.order = "pretrain,typo"
  with pytest.raises(ConfigError, match="typo"):
    stages.stages_from_config(c)


def test_cwm_32b_recipe():
  c = grids.parse_config("configs/cwm_32b.py:stage=pretrain")
  all_stages = stages.stages_from_config(c)
  assert [s.name for s in all_stages] == ["pretrain", "midtrain", "sft"]
  pre, mid, sft = (stages.stage_config(c, i, "/w") for i in range(3))
  # Token budgets (CWM technical report) become steps at the configured batch.
  assert pre.total_steps == math.ceil(8e12 / (2048 * 8192))
  assert mid.total_steps == pre.total_steps + math.ceil(5e12 / (128 * 131072))
  assert sft.total_steps == math.ceil(100e9 / (256 * 32768))
  m_pre, m_mid, m_sft = (model_config(x) for x in (pre, mid, sft))
  assert m_pre.rope_scaling is None and set(m_pre.layer_windows) == {8192}
  assert (
    m_mid.rope_scaling == cwm_32b().rope_scaling and m_mid.layer_windows == cwm_32b().layer_windows
  )
  assert m_sft.rope_scaling is not None and sft.seq_len == 32768
  assert m_mid.param_count() == 32_581_097_472
  assert not mid.init_from.params_only and sft.init_from.params_only
  # A stage's `execution` section reaches its config (pretrain: splash's fused backward).
  assert execution_config(pre).splash_fused_backward
  assert not execution_config(mid).splash_fused_backward
  weights = {m["path"].rsplit("/", 1)[1]: m["weight"] for m in mid.data.mixture}
  assert abs(sum(weights.values()) - 1) < 1e-9 and weights["code"] == 0.4
  assert weights["rehearsal"] == 0.3 and mid.data.mixture[0]["path"].startswith("/data/cwm/")
  for sc in (pre, mid, sft):  # every stage's data section is a valid pipeline config
    DataConfig.from_config(sc.data)
  rl = grids.parse_config("configs/cwm_32b.py:stage=rl")
  assert (rl.rl.eps_low, rl.rl.eps_high, rl.rl.async_rollouts) == (0.2, 0.25, True)
  with pytest.raises(ConfigError, match="stage="):
    grids.parse_config("configs/cwm_32b.py:stage=posttrain")


def _train(workdir, *extra, kill_at_step=0):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  program = (
    ["-m", "cwm_jax.train"]
    if not kill_at_step
    else [os.path.join(ROOT, "tests", "faults.py"), "train", f"--kill_at_step={kill_at_step}"]
  )
  return subprocess.run(
    [
      sys.executable,
      *program,
      "--config",
      "configs/smoke.py:schedule=all,source=synthetic",
      "--workdir",
      str(workdir),
      "--config.schedule.finish=False",
      "--config.model.overrides.vocab_size=512",
      *extra,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _meta(workdir, stage, step):
  with open(os.path.join(workdir, stage, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def test_schedule_runs_all_stages_and_resumes_after_a_kill(tmp_path):
  killed = _train(tmp_path, kill_at_step=13)  # in mid-train, after ckpt 12
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "midtrain" / "checkpoints")) == ["12"]
  pre_records = _records(tmp_path / "pretrain" / "metrics.jsonl")
  resumed = _train(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "stage pretrain: finished" in resumed.stderr
  assert "resuming from" in resumed.stderr and "step 12" in resumed.stderr
  assert _records(tmp_path / "pretrain" / "metrics.jsonl") == pre_records  # not re-run
  mid = _records(tmp_path / "midtrain" / "metrics.jsonl")
  assert [r["step"] for r in mid] == list(range(9, 15))
  # Mid-train continues pre-train's LR schedule (one cosine over 14 steps).
  lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 2, 14, 3e-4)
  np.testing.assert_allclose([r["lr"] for r in mid], [lr(s - 1) for s in range(9, 15)], rtol=1e-5)
  assert mid[0]["loss"] < pre_records[0]["loss"]  # started from pre-train's weights
  meta = _meta(tmp_path, "midtrain", 14)
  assert meta["config"]["seq_len"] == 128 and meta["model"]["rope_scaling"]["factor"] == 4.0
  assert _meta(tmp_path, "pretrain", 8)["model"]["rope_scaling"] is None
  sft = _records(tmp_path / "sft" / "metrics.jsonl")
  assert [r["step"] for r in sft] == list(range(1, 7)) and sft[0]["lr"] == 0.0  # fresh optimizer
  # SFT: half of each document is prompt; only the rest carries loss weight.
  assert _meta(tmp_path, "sft", 6)["config"]["data"]["prompt_fraction"] == 0.5
  again = _train(tmp_path)
  assert again.returncode == 0 and again.stderr.count("finished") == 3


def test_sft_batches_leave_prompt_tokens_out_of_the_loss():
  from cwm_jax.train import sources  # pylint: disable=g-import-not-at-top

  sft = stages.stage_config(smoke(), 2, "/w")
  batch = next(sources.make_source(sft, model_config(sft), 0, 1))
  for row in range(batch["inputs"].shape[0]):
    for seg in set(batch["segment_ids"][row]) - {0}:
      w = batch["weights"][row][batch["segment_ids"][row] == seg]
      n_prompt = int(0.5 * len(w))
      assert not w[:n_prompt].any() and w[n_prompt:].all()
