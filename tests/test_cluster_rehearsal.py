"""A cluster's first day, rehearsed on this machine: a multi-process job (launch/local.sh,
2 processes x 4 CPU devices, gloo) with its workdir in a bucket (the local GCS emulator).

- Preemption: SIGTERM to the launcher (a cluster's notice) makes every process save the
  same step and exit 0; the same command relaunched finishes with the losses of an
  uninterrupted run on the same mesh.
- A lost host: SIGKILL of one process while a checkpoint is being written. The other
  process exits non-zero on its own once the JAX distributed service misses the dead
  one's heartbeat (no launcher stops it); the half-written step never counts as a
  checkpoint; the relaunch resumes from the last committed one and matches the
  uninterrupted losses.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cwm_jax.checkpoint import manager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
FLAGS = [
  "--config",
  os.path.join(ROOT, "configs/smoke.py"),
  f"--config.total_steps={STEPS}",
  "--config.seq_len=32",
  f"--config.optimizer.decay_steps={STEPS}",
  "--config.metrics.tensorboard=False",
  "--config.model.overrides.n_layers=2",
  "--config.model.overrides.dim=32",
  "--config.model.overrides.ffn_dim=64",
  "--config.model.overrides.vocab_size=128",
  "--config.compiler_options.xla_backend_optimization_level=0",
  "--config.mesh.fsdp=4",
  "--config.mesh.tensor=2",
  "--config.checkpoint_every=2",
]
HEARTBEAT_S = 10
TIMEOUT_S = 600  # a hang, not a slow machine, is what this bound catches


def _env(**extra) -> dict:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_DEFAULT_MATMUL_PRECISION="highest",
    PYTHON=sys.executable,
    DEVICES_PER_PROCESS="4",
  )
  env.pop("XLA_FLAGS", None)  # local.sh sets the device count per process
  env.update(extra)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _launch(workdir: str, *extra, program: str = "", cwd: str = ROOT, **env_extra):
  env = _env(**({"TRAIN_PROGRAM": program} if program else {}), **env_extra)
  return subprocess.run(
    ["bash", os.path.join(ROOT, "launch/local.sh"), "2", *FLAGS, "--workdir", workdir, *extra],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def _faults(*flags) -> str:
  return " ".join([os.path.join(ROOT, "tests", "faults.py"), "train", *flags])


def _losses(gcs, workdir: str) -> list[float]:
  from cwm_jax import storage

  records = [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def reference(gcs):
  """An uninterrupted 2-process run on the bucket: the losses every rehearsal must match."""
  workdir = gcs.bucket("rehearsal-ref") + "/run"
  run = _launch(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  return _losses(gcs, workdir)


def test_preemption_saves_one_step_everywhere_and_relaunch_matches(gcs, reference, tmp_path):
  bucket = gcs.bucket("rehearsal-term")
  workdir = bucket + "/run"
  # Process 0 SIGTERMs the launcher after step 3, which forwards it to both processes.
  run = _launch(workdir, program=_faults("--term_parent_at_step=3"), cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  steps = manager.complete_steps(workdir + "/checkpoints")
  # Both processes stopped at the sync point after step 3 and saved it: the job's last
  # record is that step, and it is committed (every process's writes landed).
  preempted_at = steps[-1]
  assert 3 < preempted_at < STEPS and 2 in steps, steps
  assert _losses_upto(workdir) == preempted_at

  run = _launch(workdir, cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"resuming from {workdir}/checkpoints step {preempted_at}" in run.stderr
  np.testing.assert_allclose(_losses(gcs, workdir), reference, rtol=1e-5)
  assert os.listdir(tmp_path) == []  # nothing local: no 'gs:' folder, no stray files
  assert {o.split("/")[1] for o in gcs.objects("rehearsal-term")} == {
    "checkpoints",
    "metrics.jsonl",
    "goodput.json",
  }


def _losses_upto(workdir: str) -> int:
  from cwm_jax import storage

  return json.loads(storage.read_text(f"{workdir}/metrics.jsonl").splitlines()[-1])["step"]


def test_lost_host_mid_save_ends_the_job_and_relaunch_resumes(gcs, reference, tmp_path):
  workdir = gcs.bucket("rehearsal-kill") + "/run"
  port = str(__import__("gcs_emulator").free_port())
  procs = []
  for i in range(2):
    # Started directly, not through the launcher: the survivor must exit on its own.
    env = _env(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i),
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    cmd = [
      sys.executable,
      *_faults("--kill_at_step=4", "--kill_process=1", "--kill_mid_save").split(),
      *FLAGS,
      "--workdir",
      workdir,
      f"--heartbeat_timeout_s={HEARTBEAT_S}",
    ]
    log = open(tmp_path / f"p{i}.log", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
  codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  survivor_log = (tmp_path / "p0.log").read_text()
  assert codes[1] == -signal.SIGKILL, (tmp_path / "p1.log").read_text()[-3000:]
  assert codes[0] != 0, survivor_log[-3000:]
  assert "stopped sending heartbeats" in survivor_log, survivor_log[-3000:]

  # Step 4's save was cut off on process 1: step 4 may have objects but is not a checkpoint.
  ckpts = workdir + "/checkpoints"
  assert manager.complete_steps(ckpts) == [2]

  run = _launch(workdir, cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"resuming from {ckpts} step 2" in run.stderr
  np.testing.assert_allclose(_losses(gcs, workdir), reference, rtol=1e-5)
  assert manager.complete_steps(ckpts)[-1] == STEPS


def test_launcher_stops_the_job_when_a_process_fails(gcs, tmp_path):
  """The launcher's own policy (a cluster's job controller): the first non-zero exit
  stops the others at once and is the job's exit code."""
  workdir = gcs.bucket("rehearsal-launcher") + "/run"
  run = _launch(
    workdir,
    "--heartbeat_timeout_s=600",
    program=_faults("--kill_at_step=3", "--kill_process=1"),
    cwd=str(tmp_path),
    GRACE_S="5",
  )
  assert run.returncode == 128 + signal.SIGKILL, run.stderr[-3000:]
  assert "exited with 137; stopping the job" in run.stderr
  assert manager.complete_steps(workdir + "/checkpoints") == [2]
