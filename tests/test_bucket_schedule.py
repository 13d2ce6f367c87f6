"""The smoke stage schedule with its workdir in a bucket (the local GCS emulator).

Corpora, the three stages' checkpoints, metrics and TensorBoard events, the Hugging Face
export and finish.json all land in the bucket and nothing lands in the working
directory; re-running skips the finished stages; a run SIGKILLed in mid-train and
re-run ends with every stage's losses equal to the uninterrupted run's.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cwm_jax import storage
from cwm_jax.checkpoint import manager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = dict(pretrain=6, midtrain=4, sft=4)
# The steps each stage logs: mid-train carries the optimizer on; SFT starts a fresh one.
LOGGED = dict(pretrain=range(1, 7), midtrain=range(7, 11), sft=range(1, 5))
ARGS = [
  "--config",
  os.path.join(ROOT, "configs/smoke.py") + ":schedule=all,corpus_limit=4",
  "--config.checkpoint_every=2",
  "--config.schedule.sample_tokens=8",
  "--config.compiler_options.xla_backend_optimization_level=0",
  "--config.profile.start_step=2",
  "--config.profile.num_steps=1",
] + [f"--config.schedule.stages.{k}.steps={v}" for k, v in STEPS.items()]


def _train(workdir: str, cwd, cache, *program):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
    [sys.executable, *(program or ["-m", "cwm_jax.train"]), *ARGS, "--workdir", workdir],
    cwd=str(cwd),
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )


def _losses(workdir: str) -> dict[str, list[float]]:
  return {
    s: [
      json.loads(l)["loss"] for l in storage.read_text(f"{workdir}/{s}/metrics.jsonl").splitlines()
    ]
    for s in STEPS
  }


@pytest.fixture(scope="module")
def uninterrupted(gcs, tmp_path_factory):
  cwd, cache = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("jax_cache")
  workdir = gcs.bucket("schedule-ref") + "/run"
  run = _train(workdir, cwd, cache)
  assert run.returncode == 0, run.stderr[-3000:]
  assert os.listdir(cwd) == []
  return workdir, cache, run


def test_schedule_lands_in_the_bucket_and_reruns_skip(gcs, uninterrupted):
  workdir, cache, _ = uninterrupted
  objects = gcs.objects("schedule-ref", "run/")
  for corpus in ("code", "traces", "sft"):
    manifest = storage.read_json(f"{workdir}/data/{corpus}/manifest.json")
    assert manifest["records"] > 0
    assert any(o.startswith(f"run/data/{corpus}/") and o.endswith(".array_record") for o in objects)
  for stage, logged in LOGGED.items():
    assert manager.complete_steps(f"{workdir}/{stage}/checkpoints")[-1] == logged[-1]
    assert [
      json.loads(l)["step"]
      for l in storage.read_text(f"{workdir}/{stage}/metrics.jsonl").splitlines()
    ] == list(logged)
    assert any(o.startswith(f"run/{stage}/tensorboard/events.out.tfevents.") for o in objects)
  for stage in STEPS:  # goodput and memory in every record
    for r in map(json.loads, storage.read_text(f"{workdir}/{stage}/metrics.jsonl").splitlines()):
      assert 0 <= r["goodput/fraction"] <= 1 and r["memory/host_rss_bytes"] > 0
  # Profiling on: the stages whose steps include step 2 leave a trace that loads.
  from jax.profiler import ProfileData

  for stage in ("pretrain", "sft"):
    xplanes = [
      o
      for o in objects
      if o.startswith(f"run/{stage}/profile/step_2/process_0/") and o.endswith(".xplane.pb")
    ]
    assert len(xplanes) == 1, objects
    profile = ProfileData.from_serialized_xspace(
      storage.read_bytes(f"gs://schedule-ref/{xplanes[0]}")
    )
    assert any(p.name.startswith("/host:") for p in profile.planes)
  assert not any(o.startswith("run/midtrain/profile/") for o in objects)  # steps 7-10
  assert storage.read_json(f"{workdir}/hf/config.json")["vocab_size"] > 0
  finish = storage.read_json(f"{workdir}/finish.json")
  assert finish["export"]["hf"] == f"{workdir}/hf" and isinstance(finish["sample"]["text"], str)

  losses = _losses(workdir)
  cwd = cache.parent / "rerun-cwd"
  cwd.mkdir()
  again = _train(workdir, cwd, cache)
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in STEPS:
    assert f"stage {stage}: finished" in again.stderr
  assert storage.read_json(f"{workdir}/finish.json")["export"]["skipped"] == "exists"
  assert _losses(workdir) == losses and gcs.objects("schedule-ref", "run/hf/") == [
    o for o in objects if o.startswith("run/hf/")
  ]
  assert os.listdir(cwd) == []


def test_sigkill_in_midtrain_then_rerun_matches(gcs, uninterrupted, tmp_path):
  ref_dir, cache, _ = uninterrupted
  workdir = gcs.bucket("schedule-kill") + "/run"
  faults = [os.path.join(ROOT, "tests", "faults.py"), "train", "--kill_at_step=9"]
  killed = _train(workdir, tmp_path, cache, *faults)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert manager.complete_steps(f"{workdir}/midtrain/checkpoints")[-1] == 8
  done = _train(workdir, tmp_path, cache)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stage pretrain: finished" in done.stderr
  assert f"resuming from {workdir}/midtrain/checkpoints step 8" in done.stderr
  ref, got = _losses(ref_dir), _losses(workdir)
  for stage in STEPS:
    np.testing.assert_allclose(got[stage], ref[stage], rtol=1e-6, err_msg=stage)
  assert os.listdir(tmp_path) == []


def test_report_renders_every_stage_from_the_bucket(gcs, uninterrupted, tmp_path):
  workdir, _, _ = uninterrupted
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  run = subprocess.run(
    [sys.executable, "-m", "cwm_jax.report", workdir],
    cwd=str(tmp_path),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip() == f"{workdir}/report/index.html"
  page = storage.read_text(f"{workdir}/report/index.html")
  for stage in STEPS:
    assert f"{stage} ({len(LOGGED[stage])} records)" in page
  for png in ("loss", "lr", "grad_norm", "throughput", "goodput", "memory"):
    assert f'<img src="{png}.png"' in page
    assert storage.read_bytes(f"{workdir}/report/{png}.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert "interpreter" in page and "def f(n):" in page  # the trace side by side
  assert "<h2>goodput</h2>" in page
  from cwm_jax import report

  plotted = report.series(
    [
      (s, [json.loads(l) for l in storage.read_text(f"{workdir}/{s}/metrics.jsonl").splitlines()])
      for s in STEPS
    ]
  )
  xs = [x for s in STEPS for x in plotted[s][0]]
  assert xs == sorted(xs) and len(set(xs)) == len(xs)  # stages laid end to end
  assert os.listdir(tmp_path) == []
