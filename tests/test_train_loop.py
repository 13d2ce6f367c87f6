"""The trainer end to end on 8 simulated CPU devices (tiny model, 5 steps).

One uninterrupted 1-device run is the reference; SIGTERM + resume, the
sharded meshes (with a checkpoint restored onto another mesh), a SIGKILLed
CLI run and 2 processes x 4 devices must reproduce its losses.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cwm_jax.train import lm, sources
from cwm_jax.train.synthetic import SyntheticSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(n_layers=2, dim=32, ffn_dim=64, vocab_size=128)
FLAGS = [
  "--config.total_steps=5",
  "--config.seq_len=32",
  "--config.checkpoint_every=0",
  "--config.optimizer.decay_steps=5",
  "--config.metrics.tensorboard=False",
] + [f"--config.model.overrides.{k}={v}" for k, v in SMALL.items()]


def _config(**mesh):
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs/smoke.py"))
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)
  c = smoke.get_config("")
  c.model.overrides.update(SMALL)
  c.update(dict(total_steps=5, seq_len=32, checkpoint_every=0))
  c.optimizer.decay_steps = 5
  c.metrics.tensorboard = False
  c.compiler_options.xla_backend_optimization_level = 0
  c.mesh.update({**dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh})
  return c


def _losses(workdir) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))
  return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  out = lm.train(_config(), workdir, devices=jax.devices()[:1])
  assert out["step"] == 5 and not out["preempted"]
  rec = out["records"][-1]
  assert {"loss", "grad_norm", "lr", "tokens_per_sec", "step_time", "mfu"} <= set(rec)
  assert rec["tokens_per_sec"] > 0 and 0 < rec["mfu"] < 1
  losses = _losses(workdir)
  assert losses[-1] < losses[0]  # it learns
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]
  return losses


def _sigterm_source(at_index):
  def factory(config, model_cfg, process_index, process_count):
    src = sources.SOURCES["synthetic"](config, model_cfg, process_index, process_count)

    class Wrapped(SyntheticSource):
      def __next__(self):
        if self._index == at_index:
          os.kill(os.getpid(), signal.SIGTERM)
        return SyntheticSource.__next__(self)

    src.__class__ = Wrapped
    return src

  return factory


def test_sigterm_saves_then_resume_is_exact(reference, tmp_path, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "sigterm_at_2", _sigterm_source(2))
  c = _config()
  c.data.source = "sigterm_at_2"
  out = lm.train(c, str(tmp_path), devices=jax.devices()[:1])
  assert out["preempted"] and out["step"] == 3
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  out = lm.train(_config(), str(tmp_path), devices=jax.devices()[:1])
  assert out["step"] == 5
  np.testing.assert_allclose(_losses(tmp_path), reference, rtol=1e-6)


def test_sharded_meshes_match_and_restore_reshards(reference, tmp_path):
  c = _config(fsdp=4, tensor=2)
  c.total_steps = 3  # the schedule is fixed by optimizer.decay_steps
  lm.train(c, str(tmp_path))
  np.testing.assert_allclose(_losses(tmp_path), reference[:3], rtol=1e-5)
  out = lm.train(_config(data=2, fsdp=2, tensor=2), str(tmp_path))  # restores step 3
  assert out["step"] == 5 and [r["step"] for r in out["records"]] == [4, 5]
  np.testing.assert_allclose(_losses(tmp_path), reference, rtol=1e-5)


def _env(devices: int) -> dict:
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    JAX_DEFAULT_MATMUL_PRECISION="highest",
  )
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _cli(workdir, *extra, kill_at_step=0):
  program = (
    ["-m", "cwm_jax.train"]
    if not kill_at_step
    else [os.path.join(ROOT, "tests", "faults.py"), "train", f"--kill_at_step={kill_at_step}"]
  )
  return [
    sys.executable,
    *program,
    "--config",
    os.path.join(ROOT, "configs/smoke.py"),
    "--workdir",
    str(workdir),
    *FLAGS,
    "--config.compiler_options.xla_backend_optimization_level=0",
    *extra,
  ]


def test_sigkill_then_restart_matches(reference, tmp_path):
  one = ["--config.mesh.fsdp=1"]
  env = _env(1)
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  killed = subprocess.run(
    _cli(tmp_path / "run", *one, "--config.checkpoint_every=3", kill_at_step=4),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["3"]
  done = subprocess.run(
    _cli(tmp_path / "run", *one, "--config.checkpoint_every=3"),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / "run"), reference, rtol=1e-6)


def test_two_processes_match_one(reference, tmp_path):
  """launch/local.sh 2: 2 processes x 4 devices (gloo) == the 1-device run."""
  env = dict(_env(4), PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
  del env["XLA_FLAGS"]
  mesh = ["--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.total_steps=3"]
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "launch/local.sh"), "2", *_cli(tmp_path, *mesh)[3:]],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(_losses(tmp_path), reference[:3], rtol=1e-5)
