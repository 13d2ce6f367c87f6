"""Expand a sweep over a run config and launch (or print) one run per point.

  python -m cwm_jax.sweep --config configs/smoke.py --sweep configs/sweeps/smoke_lr.py \
      --launcher local --workdir runs/sweep [--dry_run] [--launcher_flags=--nodes=4]

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
    "launcher_flags", [], "Extra argument for the launcher script (repeatable), e.g. --nodes=4.")


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}; pass settings as --flags "
                      "(launcher options as --launcher_flags=...)")
  check_config_file("config", _CONFIG.value)
  grids.run_sweep(_CONFIG.value, _SWEEP.value, _LAUNCHER.value, _WORKDIR.value,
                   dry_run=_DRY_RUN.value, launcher_flags=_LAUNCHER_FLAGS.value)


def run():
  run_main(main)


if __name__ == "__main__":
  run()
