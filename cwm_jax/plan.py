"""Plan a model or a training config before allocating anything.

  python -m cwm_jax.plan --preset cwm_32b [--seq_len 8192]
  python -m cwm_jax.plan --config configs/cwm_32b.py:stage=pretrain --devices 64 \
      [--mesh data=8,fsdp=8] [--hbm_gb 95] [--peak_tflops 989]

`--preset` prints the analytic plan (parameters, per-layer windows, FLOPs per
token, bytes). `--config` also compiles the real train step ahead of time on
`--devices` simulated host devices and prints per-device memory and step
time; it exits 2 when the step does not fit `--hbm_gb` per device. JAX reads
the device count once, so this process re-executes itself with XLA_FLAGS set
when jax was imported first or the flag is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

from cwm_jax.cli import run_main

_PRESET = flags.DEFINE_string("preset", None, "Model preset name (cwm_32b, cwm_1b, tiny).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file[:arg], e.g. configs/cwm_32b.py:stage=pretrain; "
    "--config.FIELD=VALUE overrides fields.", lock_config=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length for --preset (default: max_seq_len).")
_DEVICES = flags.DEFINE_integer("devices", None, "Simulated devices (default: the config's mesh size).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh override, e.g. data=8,fsdp=8.")
_HBM_GB = flags.DEFINE_float("hbm_gb", None, "Memory per device in GB; exit 2 if the step does not fit.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak dense bf16 TFLOP/s per device (H100 SXM: 989).")

_REEXEC = "CWM_PLAN_REEXEC"


# Cheaper host code generation; buffer assignment (the memory figures) is unchanged.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def _device_flag(n: int) -> str:
  return f"--xla_force_host_platform_device_count={n}"


def _xla_flags(n: int) -> str:
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if "device_count" not in f and f.split("=")[0] not in {x.split("=")[0] for x in _FAST_COMPILE}]
  return " ".join(kept + [_device_flag(n), *_FAST_COMPILE])


def _reexec_with_devices(n: int, argv: list[str]) -> int:
  """Runs this command again in a fresh interpreter that sees n host devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = _xla_flags(n)
  env["JAX_PLATFORMS"] = "cpu"
  env[_REEXEC] = "1"
  return subprocess.call([sys.executable, "-m", "cwm_jax.plan", *argv[1:]], env=env)


def _use_host_devices(n: int) -> None:
  """Makes JAX see n CPU devices: set XLA_FLAGS if no backend exists yet, else re-exec."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    os.environ["XLA_FLAGS"] = _xla_flags(n)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() < n and not os.environ.get(_REEXEC):
    sys.exit(_reexec_with_devices(n, sys.argv))


def _print(result: dict) -> None:
  """One JSON object, one top-level key per line."""
  body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items())
  print("{\n" + body + "\n}")


def main(argv):
  if bool(_PRESET.value) == (_CONFIG.value is not None):
    raise app.UsageError("give exactly one of --preset or --config")
  from cwm_jax.model.config import ConfigError  # noqa: no jax import
  try:
    if _PRESET.value:
      from cwm_jax import planner
      from cwm_jax.model.config import preset
      result = planner.analytic_plan(preset(_PRESET.value), _SEQ_LEN.value)
    else:
      from cwm_jax.train.flops_plan import NotFitting, aot_plan, devices_needed
      n = _DEVICES.value or devices_needed(_CONFIG.value, _MESH.value)
      _use_host_devices(n)
      try:
        result = aot_plan(_CONFIG.value, n, _MESH.value, _HBM_GB.value, _PEAK.value)
      except NotFitting as e:
        _print(e.plan)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  _print(result)


def run():
  run_main(main)


if __name__ == "__main__":
  run()
