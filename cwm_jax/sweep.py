"""Expand a sweep over a run config and launch (or print) one run per point.

  python -m cwm_jax.sweep --config configs/smoke.py --sweep configs/sweeps/smoke_lr.py \
      --launcher local --workdir runs/sweep [--dry_run] [--launcher_flags=...]
  ... --launcher tpu --tpu NAME --zone ZONE [--project P] [--tpu_type v5p-128]
  ... --launcher slurm --partition P [--nodes N]
  ... --launcher k8s --image IMAGE [--nodes N] [--launcher_flags=--tpu_type=T ...]
  ... --launcher xpk --cluster C --tpu_type T --image IMAGE [--num_slices S]

Every point is parsed and validated before anything is launched; an invalid
point exits 2 naming the point and the field.
"""

from __future__ import annotations

from absl import flags

from cwm_jax.base import ConfigError
from cwm_jax.cli import check_config_file, run_main
from cwm_jax.recipe import grids

_CONFIG = flags.DEFINE_string("config", None, "Run config file[:arg].", required=True)
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().", required=True)
_LAUNCHER = flags.DEFINE_enum("launcher", "local", grids.LAUNCHERS, "Where to launch the runs.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweeps", "Parent of the runs' workdirs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the launch commands only.")
_LAUNCHER_FLAGS = flags.DEFINE_multi_string(
  "launcher_flags",
  [],
  "Extra argument for the launcher script (repeatable), e.g. "
  "--max_restarts=5 (sbatch options for --launcher slurm).",
)
# Where the runs go; which of these each launcher needs is grids.LAUNCHER_NEEDS.
_TARGET = {
  "tpu": flags.DEFINE_string("tpu", None, "tpu: the TPU VM or queued resource name."),
  "zone": flags.DEFINE_string("zone", None, "tpu, xpk: the zone."),
  "project": flags.DEFINE_string("project", None, "tpu, xpk: the Google Cloud project."),
  "tpu_type": flags.DEFINE_string(
    "tpu_type", None, "tpu (a queued resource is created), xpk: the TPU type, e.g. v5p-128."
  ),
  "num_slices": flags.DEFINE_integer("num_slices", None, "tpu, xpk: TPU slices."),
  "partition": flags.DEFINE_string("partition", None, "slurm: the partition."),
  "nodes": flags.DEFINE_integer("nodes", None, "slurm: nodes per run; k8s: hosts per run."),
  "image": flags.DEFINE_string("image", None, "k8s, xpk: the container image."),
  "cluster": flags.DEFINE_string("cluster", None, "xpk: the GKE cluster."),
}


def main(argv):
  if len(argv) > 1:
    raise ConfigError(
      f"unexpected arguments {argv[1:]}; pass settings as --flags "
      "(launcher options as --launcher_flags=...)"
    )
  target = {k: f.value for k, f in _TARGET.items() if f.value is not None}
  grids.check_target(_LAUNCHER.value, target)  # before the config or any point is read
  check_config_file("config", _CONFIG.value)
  grids.run_sweep(
    _CONFIG.value,
    _SWEEP.value,
    _LAUNCHER.value,
    _WORKDIR.value,
    dry_run=_DRY_RUN.value,
    launcher_flags=_LAUNCHER_FLAGS.value,
    target=target,
  )


def run():
  run_main(main)


if __name__ == "__main__":
  run()
