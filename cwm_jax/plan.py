"""Plan a model or a training config before allocating anything.

  python -m cwm_jax.plan --preset cwm_32b [--seq_len 8192]
  python -m cwm_jax.plan --config configs/cwm_32b.py:stage=pretrain --topology v5p-512 \
      [--num_slices 1] [--mesh data=1,fsdp=256] [--hbm_gb 95]
  python -m cwm_jax.plan --config configs/cwm_32b.py:stage=pretrain --devices 64 \
      [--mesh data=8,fsdp=8] [--hbm_gb 95] [--peak_tflops 989]
  python -m cwm_jax.plan --config configs/cwm_32b.py:stage=pretrain --gpus h100:8x8 \
      [--config.execution.attention_impl=cudnn]  # GPU compiler, CUDA plugin, no GPU

`--preset` prints the analytic plan (parameters, per-layer windows, FLOPs per
token, bytes). `--config` compiles the stage's real step ahead of time and
prints per-device memory (GiB) and step time: with `--topology` (a Cloud TPU
accelerator type such as v5p-512 / v6e-256, or a topology such as v5p:4x8x8)
for that TPU slice with libtpu's compiler (with `estimated_step_seconds`,
`estimated_mfu` and `estimated_seconds_by_kind` from the TPU compiler's cost
model, `cwm_jax.train.cost_model`), else on `--devices` simulated host devices.
An RL stage also compiles the sampler's prefill, decode and extend steps
(`"sampler"`), each counted with the train state that stays resident beside it
(the optimizer state; all of it with async rollouts). Exit 2 when a program
does not fit the chip's HBM (or `--hbm_gb`).
"""

from __future__ import annotations

import json
import math
import sys

from absl import flags
from ml_collections import config_flags

from cwm_jax.base import ConfigError
from cwm_jax.cli import run_main

_PRESET = flags.DEFINE_string("preset", None, "Model preset name (cwm_32b, cwm_1b, tiny).")
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Run config file[:arg], e.g. configs/cwm_32b.py:stage=pretrain; "
  "--config.FIELD=VALUE overrides fields.",
  lock_config=True,
)
_SEQ_LEN = flags.DEFINE_integer(
  "seq_len", None, "Sequence length for --preset (default: max_seq_len)."
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "TPU slice: accelerator type (v5p-512, v6e-256, v4-512, v5e-256) or topology (v5p:4x8x8).",
)
_GPUS = flags.DEFINE_string(
  "gpus",
  None,
  "GPU cluster compiled for with the CUDA plugin, no GPU "
  "needed: h100x8 (one host) or h100:4x8 (hosts x GPUs); h100/h200/a100.",
)
_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of TPU slices (the data axis spans them).")
_DEVICES = flags.DEFINE_integer(
  "devices", None, "Simulated host devices (default: the config's mesh size)."
)
_MESH = flags.DEFINE_string("mesh", None, "Mesh override, e.g. data=8,fsdp=8.")
_HBM_GB = flags.DEFINE_float(
  "hbm_gb",
  None,
  "Memory per device in GiB (default with --topology: "
  "the chip's HBM); exit 2 if a program does not fit.",
)
_ESTIMATE = flags.DEFINE_boolean(
  "estimate",
  True,
  "TPU plans: also compile the step unrolled at "
  "two depths for the TPU cost model's estimated step seconds and "
  "MFU (--noestimate skips those compiles).",
)
_PEAK = flags.DEFINE_float(
  "peak_tflops", 989.0, "Host plans: peak bf16 TFLOP/s per device (H100 SXM: 989)."
)


def _print(result: dict) -> None:
  """One JSON object, one top-level key per line."""
  body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items())
  print("{\n" + body + "\n}")


def _step_builders() -> dict:
  """Programs planned per stage trainer beyond the LM train step: the RL update step
  and the sampler's prefill, decode and extend steps."""
  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  return {"rl": rl_step_builder}


MAX_HOST_DEVICES = 4096  # simulated CPU devices; larger slices: --topology or --gpus


def _check_flags() -> None:
  """Every flag in range before anything is built (ConfigError: exit 2)."""
  if bool(_PRESET.value) == (_CONFIG.value is not None):
    raise ConfigError("give exactly one of --preset or --config")
  if _SEQ_LEN.value is not None and (_SEQ_LEN.value < 1 or _CONFIG.value is not None):
    raise ConfigError(
      f"--seq_len={_SEQ_LEN.value}: give a length >= 1, with --preset only "
      "(a config plans its own seq_len: --config.seq_len=N)"
    )
  if _DEVICES.value is not None and not 1 <= _DEVICES.value <= MAX_HOST_DEVICES:
    raise ConfigError(
      f"--devices={_DEVICES.value}: simulate 1..{MAX_HOST_DEVICES} host devices; "
      "plan larger slices with --topology (TPU) or --gpus"
    )
  if _SLICES.value < 1:
    raise ConfigError(f"--num_slices={_SLICES.value} must be >= 1")
  for name, value in (("hbm_gb", _HBM_GB.value), ("peak_tflops", _PEAK.value)):
    if value is not None and not (math.isfinite(value) and value > 0):
      raise ConfigError(f"--{name}={value} must be a positive number")


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}")
  _check_flags()
  if _PRESET.value:
    from cwm_jax.model.config import preset  # pylint: disable=g-import-not-at-top
    from cwm_jax.train import planning  # pylint: disable=g-import-not-at-top

    _print(planning.analytic_plan(preset(_PRESET.value), _SEQ_LEN.value))
    return
  from cwm_jax.recipe.stages import stage_configs  # pylint: disable=g-import-not-at-top
  from cwm_jax.train import planning  # pylint: disable=g-import-not-at-top

  configs = stage_configs(_CONFIG.value)
  try:
    if _GPUS.value:
      from cwm_jax.train import gpu_topology  # pylint: disable=g-import-not-at-top

      result = gpu_topology.gpu_plan(
        configs, _GPUS.value, _MESH.value, _HBM_GB.value, _step_builders()
      )
    elif _TOPOLOGY.value:
      result = planning.tpu_plan(
        configs,
        _TOPOLOGY.value,
        _SLICES.value,
        _MESH.value,
        _HBM_GB.value,
        _step_builders(),
        _ESTIMATE.value,
      )
    else:
      n = _DEVICES.value or planning.devices_needed(configs, _MESH.value)
      planning.ensure_host_devices(n, sys.argv)
      result = planning.host_plan(
        configs, n, _MESH.value, _HBM_GB.value, _PEAK.value, _step_builders()
      )
  except planning.NotFitting as e:
    _print(e.plan)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  _print(result)


def run():
  run_main(main)


if __name__ == "__main__":
  run()
