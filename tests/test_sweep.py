"""Sweeps: product/zip expansion, validation of every point before any launch."""

import os
import shlex
import subprocess
import sys

import pytest

from cwm_jax.recipe import grids
from test_launch import ROOT, parse_train_argv, train_argv


def test_product_and_zip():
  points = grids.product(grids.axis("a", [1, 2]),
                          grids.zip_(grids.axis("b", ["x", "y"]), grids.axis("c", [3, 4])))
  assert points == [{"a": 1, "b": "x", "c": 3}, {"a": 1, "b": "y", "c": 4},
                    {"a": 2, "b": "x", "c": 3}, {"a": 2, "b": "y", "c": 4}]
  with pytest.raises(grids.SweepError, match="different lengths"):
    grids.zip_(grids.axis("b", [1, 2]), grids.axis("c", [3]))
  with pytest.raises(grids.SweepError, match="swept twice"):
    grids.product(grids.axis("a", [1]), grids.axis("a", [2]))


def test_expand_names_workdirs_and_flags():
  runs = grids.expand([{"optimizer.lr": 1e-3, "model.preset": "tiny"},
                        {"optimizer.lr": 3e-3, "model.preset": "tiny"}], "My_Sweep", "/w")
  assert [r.name for r in runs] == ["my-sweep-000-preset-tiny-lr-0-001",
                                    "my-sweep-001-preset-tiny-lr-0-003"]
  assert runs[1].workdir == "/w/my-sweep-001-preset-tiny-lr-0-003"
  assert runs[0].overrides == ("--config.optimizer.lr=0.001", "--config.model.preset=tiny")


def _sweep(*args):
  return subprocess.run([sys.executable, "-m", "cwm_jax.sweep", *args], cwd=ROOT,
                        capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def test_dry_run_prints_four_distinct_commands_that_parse(tmp_path):
  out = _sweep("--config", "configs/smoke.py", "--sweep", "configs/sweeps/smoke_lr.py",
               "--launcher", "local", "--workdir", str(tmp_path), "--dry_run")
  assert out.returncode == 0, out.stderr
  commands = out.stdout.strip().splitlines()
  assert len(commands) == 4 and len(set(commands)) == 4
  assert not os.listdir(tmp_path)  # a dry run creates nothing
  workdir, config = parse_train_argv(train_argv(shlex.split(commands[3])))
  assert workdir.startswith(str(tmp_path)) and "003" in workdir
  assert (config["optimizer"]["lr"], config["total_steps"], config["optimizer"]["warmup_steps"]) \
      == (0.003, 20, 4)


def test_cluster_launchers_wrap_the_scripts(tmp_path):
  out = _sweep("--config", "configs/smoke.py", "--sweep", "configs/sweeps/smoke_lr.py",
               "--launcher", "slurm", "--workdir", str(tmp_path), "--dry_run",
               "--launcher_flags=--nodes=2")
  assert out.returncode == 0, out.stderr
  first = shlex.split(out.stdout.splitlines()[0])
  assert first[:4] == ["sbatch", f"--job-name={os.path.basename(first[first.index('--workdir') + 1])}",
                       "--nodes=2", "launch/slurm.sbatch"]
  assert first[first.index("--") + 1:] == ["--config.optimizer.lr=0.001", "--config.total_steps=10",
                                           "--config.optimizer.warmup_steps=2"]


def test_invalid_point_fails_before_anything_launches(tmp_path):
  sweep = tmp_path / "bad.py"
  sweep.write_text("from cwm_jax.recipe.grids import axis\n"
                   "def get_sweep():\n"
                   "  return axis('batch_size', [8, 8, 7])\n")  # 7: not divisible by grad_accum=2
  out = _sweep("--config", "configs/smoke.py:accum=2", "--sweep", str(sweep), "--launcher", "local",
               "--workdir", str(tmp_path / "runs"))
  assert out.returncode == 2
  assert "bad-002" in out.stderr and "batch_size=7" in out.stderr
  assert out.stdout == "" and not (tmp_path / "runs").exists()  # the valid points did not run
  typo = tmp_path / "typo.py"
  typo.write_text("from cwm_jax.recipe.grids import axis\n"
                  "def get_sweep():\n"
                  "  return axis('optimizer.learning_rate', [1e-3])\n")
  out = _sweep("--config", "configs/smoke.py", "--sweep", str(typo), "--dry_run")
  assert out.returncode == 2 and "learning_rate" in out.stderr
