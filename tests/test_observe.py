"""What a run reports about itself: goodput buckets and their summary across relaunches,
memory, ETA, profiles on a schedule and on request (into a bucket), and wandb offline."""

import json

import jax
import pytest
from test_train_loop import _config

from cwm_jax import storage
from cwm_jax.train import lm
from cwm_jax.train.metrics import progress_line


def _records(workdir):
  return [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def _one_device(config, workdir, hooks=()):
  return lm.train(config, workdir, devices=jax.devices()[:1], hooks=hooks)


def test_goodput_memory_eta_and_profiles_in_a_bucket(gcs):
  workdir = gcs.bucket("observe-run") + "/run"
  c = _config()
  c.profile.update(dict(start_step=2, num_steps=2))
  # A seed no other test uses: a worker keeps the last runtime it set up (its compiled steps are
  # reused), so an equal config run earlier in the same worker would leave nothing to compile.
  c.seed = 4711

  def request_at_step_1(ctx):  # a user asking a running job for a capture
    if ctx.step == 1:
      storage.write_text(f"{workdir}/profile.request", "please")

  out = _one_device(c, workdir, hooks=[request_at_step_1])
  assert out["step"] == 5
  objects = gcs.objects("observe-run", "run/profile/")
  # Scheduled: steps 2-3. Requested after step 1, served once that capture ended: steps 4-5.
  for name in ("step_2", "request_step_4"):
    assert any(
      o.startswith(f"run/profile/{name}/process_0/") and o.endswith(".xplane.pb") for o in objects
    ), objects

  records = _records(workdir)
  for r in records:
    assert 0.0 <= r["goodput/fraction"] <= 1.0
    assert r["memory/host_rss_bytes"] > 0 and r["memory/live_array_bytes"] > 0
    assert {f"goodput/{b}_s" for b in ("compile", "data", "step", "save", "eval")} <= set(r)
  assert records[-1]["eta_s"] == 0.0 and records[1]["eta_s"] > 0.0
  assert records[0]["goodput/compile_s"] > 0.0  # the first step compiles the train step
  assert "ETA" in progress_line(records[1], 5) and "goodput" in progress_line(records[1], 5)

  saved = storage.read_json(f"{workdir}/goodput.json")
  assert len(saved["launches"]) == 1 and saved["launches"][0]["last_step"] == 5
  s = saved["summary"]
  assert s["lost_s"] == 0.0 and 0.0 < s["goodput"] < 1.0
  assert sum(s["buckets"].values()) <= s["wall_s"]  # disjoint pieces of the wall time


def test_goodput_counts_redone_steps_after_a_crash(tmp_path):
  workdir = str(tmp_path / "run")
  c = _config()
  c.checkpoint_every = 3

  class Crash(Exception):
    pass

  def crash_at_5(ctx):
    if ctx.step == 5:
      raise Crash()

  with pytest.raises(Crash):
    _one_device(c, workdir, hooks=[crash_at_5])
  first = storage.read_json(f"{workdir}/goodput.json")["launches"]
  assert len(first) == 1 and first[0]["last_step"] == 5

  out = _one_device(_config(), workdir)  # resumes from step 3: steps 4 and 5 are redone
  assert out["step"] == 5
  saved = storage.read_json(f"{workdir}/goodput.json")
  relaunch = saved["launches"][1]
  assert relaunch["first_step"] == 3 and relaunch["last_step"] == 5
  step_time = first[0]["buckets"]["step"] / (first[0]["last_step"] - first[0]["first_step"])
  assert relaunch["lost_s"] >= 2 * step_time > 0.0
  assert saved["summary"]["launches"] == 2 and saved["summary"]["lost_s"] == relaunch["lost_s"]
  assert out["goodput"]["launches"] == 2


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = str(tmp_path / "run")
  c = _config()
  c.metrics.update(dict(wandb_project="cwm-test", wandb_mode="offline"))
  logged = []
  real_init = wandb.init

  def init(**kw):
    run = real_init(**kw)
    log = run.log
    run.log = lambda data, step=None: (logged.append((step, dict(data))), log(data, step=step))
    return run

  monkeypatch.setattr(wandb, "init", init)
  _one_device(c, workdir)
  records = _records(workdir)
  assert [s for s, _ in logged] == [r["step"] for r in records]
  assert [d["loss"] for _, d in logged] == [r["loss"] for r in records]
