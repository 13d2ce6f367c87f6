"""Hyperparameter sweeps: expand, validate every point, then launch or print.

A sweep file (`configs/sweeps/NAME.py`) defines `get_sweep()` returning a list
of points, each a `{dotted.config.field: value}` dict, built with `axis`,
`product` and `zip_`:

  def get_sweep():
    return product(axis("optimizer.lr", [1e-4, 3e-4]),
                   zip_(axis("model.dim", [64, 128]), axis("model.n_heads", [4, 8])))

Each point becomes `--config.FIELD=VALUE` flags on the training command and
is parsed by the same `config_flags` parser as `python -m cwm_jax.train`, so
a typo or a wrongly typed value fails here, before anything is launched.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.recipe import stages
from cwm_jax.train import config as config_lib

Point = dict[str, Any]
LAUNCHERS = ("local", "slurm", "tpu", "k8s", "xpk")
# The sweep flags (`cwm_jax.sweep`) each cluster launcher cannot do without; checked before
# any sweep point is expanded, written or launched.
LAUNCHER_NEEDS = {
  "slurm": {"partition": "the Slurm partition (sbatch --partition)"},
  "tpu": {"tpu": "the TPU VM or queued resource name", "zone": "its zone"},
  "k8s": {"image": "the container image (built from launch/images/)"},
  "xpk": {
    "cluster": "the GKE cluster",
    "tpu_type": "the TPU type, e.g. v5p-128",
    "image": "the container image (built from launch/images/tpu.Dockerfile)",
  },
}
# Optional target flags, passed on when set: {sweep flag: (launcher, the launcher's flag)}.
_OPTIONAL = {
  "project": {"tpu": "--project", "xpk": "--project"},
  "zone": {"xpk": "--zone"},
  "nodes": {"slurm": "--nodes", "k8s": "--num_hosts"},
  "tpu_type": {"tpu": "--accelerator_type"},
  "num_slices": {"tpu": "--num_slices", "xpk": "--num_slices"},
}


def check_target(launcher: str, target: dict[str, Any]) -> None:
  """Every flag `launcher` needs is set in `target` ({sweep flag: value}); else SweepError
  naming the missing flags."""
  if launcher not in LAUNCHERS:
    raise SweepError(f"unknown launcher {launcher!r}; choose one of {LAUNCHERS}")
  needs = LAUNCHER_NEEDS.get(launcher, {})
  missing = [f"--{k} ({what})" for k, what in needs.items() if not target.get(k)]
  if missing:
    raise SweepError(
      f"--launcher {launcher} needs {', '.join(missing)}; pass "
      f"{' '.join(f'--{k}=...' for k in needs if not target.get(k))}"
    )


class SweepError(ConfigError):
  """A sweep definition or one of its points is invalid."""


def axis(field: str, values: Sequence[Any]) -> list[Point]:
  """One field swept over `values`."""
  if not values:
    raise SweepError(f"axis {field!r} has no values")
  return [{field: v} for v in values]


def product(*axes: list[Point]) -> list[Point]:
  """Every combination of the axes' points."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip_(*axes: list[Point]) -> list[Point]:
  """Points taken together, position by position; the axes must be equally long."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise SweepError(f"zip_ of axes with different lengths {sorted(lengths)}")
  return [_merge(combo) for combo in zip(*axes)]


def _merge(points) -> Point:
  out: Point = {}
  for p in points:
    clash = set(out) & set(p)
    if clash:
      raise SweepError(f"field(s) {sorted(clash)} swept twice in one point")
    out.update(p)
  return out


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  overrides: tuple[str, ...]  # `--config.FIELD=VALUE` flags
  point: tuple[tuple[str, Any], ...]


def load_sweep(path: str) -> list[Point]:
  """Calls `get_sweep()` of the sweep file at `path`."""
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path!r} not found")
  spec = importlib.util.spec_from_file_location("cwm_sweep", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise SweepError(f"--sweep: {path} line {e.lineno}: {e.msg}; fix the syntax error") from None
  except Exception as e:  # pylint: disable=broad-except  (the user's file failed to import)
    raise SweepError(f"--sweep: importing {path} failed: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"--sweep: {path} defines no get_sweep() function")
  try:
    points = module.get_sweep()
  except SweepError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f"--sweep: {path}: get_sweep() failed: {type(e).__name__}: {e}") from None
  return _check_points(path, points)


def _check_points(path: str, points: Any) -> list[Point]:
  """`points` is a non-empty list of {dotted.field (str): value} dicts; else SweepError."""
  if not isinstance(points, (list, tuple)):
    raise SweepError(
      f"--sweep: {path}: get_sweep() returned {type(points).__name__}; it must "
      "return a list of {'dotted.field': value} dicts (use axis/product/zip_)"
    )
  if not points:
    raise SweepError(f"--sweep: {path}: get_sweep() returned no points")
  for i, p in enumerate(points):
    if not isinstance(p, dict) or not p or not all(isinstance(k, str) and k for k in p):
      raise SweepError(
        f"--sweep: {path}: point {i} is {p!r}; each point must be a non-empty "
        "{'dotted.field': value} dict (use axis/product/zip_)"
      )
  return list(points)


def flag_value(value: Any) -> str:
  """A value as `config_flags` parses it for a field of that type."""
  if isinstance(value, str):
    return value
  return repr(tuple(value) if isinstance(value, list) else value)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def expand(points: list[Point], sweep_name: str, workdir: str) -> list[Run]:
  """Unique run names and workdirs: `NAME-IDX-field-value...` (DNS-1123 safe), each under
  `workdir` (a local folder or a URL such as gs://bucket/sweeps)."""
  runs = []
  for i, point in enumerate(points):
    tag = "-".join(f"{k.rsplit('.', 1)[-1]}-{flag_value(v)}" for k, v in sorted(point.items()))
    name = _slug(f"{sweep_name}-{i:03d}-{tag}")[:63].rstrip("-")
    overrides = tuple(f"--config.{k}={flag_value(v)}" for k, v in point.items())
    runs.append(Run(name, storage.join(workdir, name), overrides, tuple(point.items())))
  if len({r.name for r in runs}) != len(runs):
    raise SweepError("sweep points produce duplicate run names")
  return runs


def parse_config(config_arg: str, overrides: Sequence[str] = ()):
  """The config exactly as `python -m cwm_jax.train --config=ARG OVERRIDES` parses it."""
  fv = flags.FlagValues()
  argv = ["train", f"--config={config_arg}", *overrides]
  config_flags.DEFINE_config_file(
    "config", None, "run config", flag_values=fv, lock_config=True, sys_argv=argv
  )
  try:
    fv(argv)
    config = fv.config
    if not isinstance(config, ml_collections.ConfigDict):
      raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    lines = [l for l in str(cause).splitlines() if l.strip()]
    if isinstance(cause, KeyError):
      lines = [f"no config field {cause} (check the sweep's field names)"]
    raise SweepError(
      f"--config {config_arg} with {' '.join(overrides) or 'no overrides'}: "
      f"{type(cause).__name__}: {lines[-1].strip() if lines else ''}"
    ) from None
  return config


def validate(config_arg: str, runs: list[Run], check: Callable[[Any], None] | None) -> None:
  """Parses and checks every run's config; the first bad point raises SweepError."""
  for run in runs:
    config = parse_config(config_arg, run.overrides)
    if check is not None:
      try:
        check(config)
      except ConfigError as e:
        raise SweepError(f"sweep point {run.name} ({' '.join(run.overrides)}): {e}") from e


def check_point(config, launcher: str = "local") -> None:
  """Validates a run config (every stage of a schedule) as the trainer would.

  The device count is the mesh's product; a -1 axis counts as this machine's
  devices for the local launcher and as 1 (the smallest fitting cluster) otherwise.
  """
  for name, c in stages.stage_configs(config):
    fixed = math.prod(int(s) for s in dict(c.mesh).values() if int(s) != -1)
    fill = any(int(s) == -1 for s in dict(c.mesh).values())
    n = fixed * (max(jax.device_count() // fixed, 1) if fill and launcher == "local" else 1)
    try:
      config_lib.validate(c, config_lib.model_config(c), n, 1)
    except ConfigError as e:
      raise ConfigError(f"{name}: {e}") from e


def launch_command(
  launcher: str,
  config_arg: str,
  run: Run,
  launcher_flags: Sequence[str] = (),
  target: dict[str, Any] | None = None,
) -> list[str]:
  """The argv that launches `run` with `launcher`; `target` holds the sweep's cluster flags
  (see LAUNCHER_NEEDS)."""
  target = dict(target or {})
  py = sys.executable
  passthrough = ["--", *run.overrides] if run.overrides else []
  train = ["--config", config_arg, "--workdir", run.workdir]
  optional = [
    f"{flag}={target[k]}"
    for k, by in _OPTIONAL.items()
    for l, flag in by.items()
    if l == launcher and target.get(k)
  ]
  if launcher == "local":
    return [
      py,
      "-m",
      "cwm_jax.train",
      f"--config={config_arg}",
      f"--workdir={run.workdir}",
      *launcher_flags,
      *run.overrides,
    ]
  if launcher == "slurm":
    # sbatch options (--partition, --nodes, --launcher_flags) go before the script.
    return [
      "sbatch",
      f"--job-name={run.name}",
      f"--partition={target['partition']}",
      *optional,
      *launcher_flags,
      "launch/slurm.sbatch",
      *train,
      *passthrough,
    ]
  if launcher == "tpu":
    return [
      "bash",
      "launch/tpu_pod.sh",
      f"--tpu={target['tpu']}",
      f"--zone={target['zone']}",
      *optional,
      *train,
      *launcher_flags,
      *passthrough,
    ]
  if launcher == "k8s":
    return [
      py,
      "launch/k8s_jobset.py",
      "--name",
      run.name,
      f"--image={target['image']}",
      *optional,
      *train,
      *launcher_flags,
      *passthrough,
    ]
  if launcher == "xpk":
    return [
      py,
      "launch/xpk.py",
      f"--cluster={target['cluster']}",
      "--workload",
      run.name,
      f"--tpu_type={target['tpu_type']}",
      f"--image={target['image']}",
      *optional,
      *train,
      *launcher_flags,
      *passthrough,
    ]
  raise SweepError(f"unknown launcher {launcher!r}; choose one of {LAUNCHERS}")


def run_sweep(
  config_arg: str,
  sweep_path: str,
  launcher: str,
  workdir: str,
  *,
  dry_run: bool = False,
  launcher_flags: Sequence[str] = (),
  check: Callable[[Any], None] | None = None,
  out=sys.stdout,
  target: dict[str, Any] | None = None,
) -> list[list[str]]:
  """Checks the launcher's flags, expands, validates all points, then prints (dry run) or
  runs each launch."""
  check_target(launcher, dict(target or {}))
  name = os.path.splitext(os.path.basename(sweep_path))[0]
  runs = expand(load_sweep(sweep_path), name, workdir)
  validate(config_arg, runs, check or (lambda c: check_point(c, launcher)))
  commands = [launch_command(launcher, config_arg, r, launcher_flags, target) for r in runs]
  for run, cmd in zip(runs, commands):
    print(shlex.join(cmd), file=out, flush=True)
    if not dry_run:
      if launcher == "local":
        storage.makedirs(run.workdir)
      subprocess.run(cmd, check=True)
  return commands
