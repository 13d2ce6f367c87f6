"""Sweeps: product/zip expansion, validation of every point before any launch."""

import os
import shlex
import subprocess
import sys

import pytest
from test_launch import ROOT, parse_train_argv, train_argv

from cwm_jax.recipe import grids


def test_product_and_zip():
  points = grids.product(
    grids.axis("a", [1, 2]), grids.zip_(grids.axis("b", ["x", "y"]), grids.axis("c", [3, 4]))
  )
  assert points == [
    {"a": 1, "b": "x", "c": 3},
    {"a": 1, "b": "y", "c": 4},
    {"a": 2, "b": "x", "c": 3},
    {"a": 2, "b": "y", "c": 4},
  ]
  with pytest.raises(grids.SweepError, match="different lengths"):
    grids.zip_(grids.axis("b", [1, 2]), grids.axis("c", [3]))
  with pytest.raises(grids.SweepError, match="swept twice"):
    grids.product(grids.axis("a", [1]), grids.axis("a", [2]))


def test_expand_names_workdirs_and_flags():
  runs = grids.expand(
    [
      {"optimizer.lr": 1e-3, "model.preset": "tiny"},
      {"optimizer.lr": 3e-3, "model.preset": "tiny"},
    ],
    "My_Sweep",
    "/w",
  )
  assert [r.name for r in runs] == [
    "my-sweep-000-preset-tiny-lr-0-001",
    "my-sweep-001-preset-tiny-lr-0-003",
  ]
  assert runs[1].workdir == "/w/my-sweep-001-preset-tiny-lr-0-003"
  assert runs[0].overrides == ("--config.optimizer.lr=0.001", "--config.model.preset=tiny")


def _sweep(*args):
  return subprocess.run(
    [sys.executable, "-m", "cwm_jax.sweep", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
  )


def test_dry_run_prints_four_distinct_commands_that_parse(tmp_path):
  out = _sweep(
    "--config",
    "configs/smoke.py",
    "--sweep",
    "configs/sweeps/smoke_lr.py",
    "--launcher",
    "local",
    "--workdir",
    str(tmp_path),
    "--dry_run",
  )
  assert out.returncode == 0, out.stderr
  commands = out.stdout.strip().splitlines()
  assert len(commands) == 4 and len(set(commands)) == 4
  assert not os.listdir(tmp_path)  # a dry run creates nothing
  workdir, config = parse_train_argv(train_argv(shlex.split(commands[3])))
  assert workdir.startswith(str(tmp_path)) and "003" in workdir
  assert (
    config["optimizer"]["lr"],
    config["total_steps"],
    config["optimizer"]["warmup_steps"],
  ) == (0.003, 20, 4)


def test_cluster_launchers_wrap_the_scripts(tmp_path):
  out = _sweep(
    "--config",
    "configs/smoke.py",
    "--sweep",
    "configs/sweeps/smoke_lr.py",
    "--launcher",
    "slurm",
    "--workdir",
    str(tmp_path),
    "--dry_run",
    "--partition=h100",
    "--nodes=2",
    "--launcher_flags=--time=04:00:00",
  )
  assert out.returncode == 0, out.stderr
  first = shlex.split(out.stdout.splitlines()[0])
  assert first[:6] == [
    "sbatch",
    f"--job-name={os.path.basename(first[first.index('--workdir') + 1])}",
    "--partition=h100",
    "--nodes=2",
    "--time=04:00:00",
    "launch/slurm.sbatch",
  ]
  assert first[first.index("--") + 1 :] == [
    "--config.optimizer.lr=0.001",
    "--config.total_steps=10",
    "--config.optimizer.warmup_steps=2",
  ]


def _dry_run_of(command):
  """Runs a sweep's launch command with the launcher's own --dry_run (sbatch: the script)."""
  if command[0] == "sbatch":
    command = ["bash", *command[command.index("launch/slurm.sbatch") :]]
  i = command.index("--") if "--" in command else len(command)
  out = subprocess.run(
    [*command[:i], "--dry_run", *command[i:]],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.mark.parametrize(
  "launcher,target,needs",
  [
    ("tpu", ["--tpu=cwm", "--zone=us-east5-a", "--tpu_type=v5p-16", "--project=p"], "--zone"),
    ("slurm", ["--partition=h100"], "--partition"),
    ("k8s", ["--image=reg/cwm:gpu", "--nodes=2"], "--image"),
    (
      "xpk",
      ["--cluster=c", "--tpu_type=v5p-16", "--image=reg/cwm:tpu", "--num_slices=2"],
      "--cluster",
    ),
  ],
)
def test_each_launcher_gets_what_it_needs(tmp_path, launcher, target, needs):
  """A missing target flag exits 2 naming it, before anything is written; given, each
  printed launch runs the launcher's own dry run with the point's train flags."""
  workdir = str(tmp_path / "runs") if launcher == "slurm" else "gs://bucket/sweeps"
  args = [
    "--config",
    "configs/smoke.py",
    "--sweep",
    "configs/sweeps/smoke_lr.py",
    "--launcher",
    launcher,
    "--workdir",
    workdir,
  ]
  bad = _sweep(*args, *[t for t in target if not t.startswith(needs + "=")])
  assert bad.returncode == 2 and needs in bad.stderr and f"--launcher {launcher}" in bad.stderr
  assert bad.stdout == "" and not (tmp_path / "runs").exists()
  out = _sweep(*args, *target, "--dry_run")
  assert out.returncode == 0, out.stderr
  command = shlex.split(out.stdout.splitlines()[3])
  for t in target:
    flag, value = t.split("=", 1)
    assert any(value in w for w in command), (t, command)
  printed = _dry_run_of(command)
  assert "--config.optimizer.lr=0.003" in printed and "cwm_jax.train" in printed
  assert not (tmp_path / "runs").exists()


def test_invalid_point_fails_before_anything_launches(tmp_path):
  sweep = tmp_path / "bad.py"
  sweep.write_text(
    "from cwm_jax.recipe.grids import axis\n"
    "def get_sweep():\n"
    "  return axis('batch_size', [8, 8, 7])\n"
  )  # 7: not divisible by grad_accum=2
  out = _sweep(
    "--config",
    "configs/smoke.py:accum=2",
    "--sweep",
    str(sweep),
    "--launcher",
    "local",
    "--workdir",
    str(tmp_path / "runs"),
  )
  assert out.returncode == 2
  assert "bad-002" in out.stderr and "batch_size=7" in out.stderr
  assert out.stdout == "" and not (tmp_path / "runs").exists()  # the valid points did not run
  typo = tmp_path / "typo.py"
  typo.write_text(
    "from cwm_jax.recipe.grids import axis\n"
    "def get_sweep():\n"
    "  return axis('optimizer.learning_rate', [1e-3])\n"
  )
  out = _sweep("--config", "configs/smoke.py", "--sweep", str(typo), "--dry_run")
  assert out.returncode == 2 and "learning_rate" in out.stderr
