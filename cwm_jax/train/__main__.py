"""Train: `python -m cwm_jax.train --config configs/smoke.py[:ARGS] --workdir DIR`.

Multi-host: --coordinator_address/--num_processes/--process_id (or the
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID environment).
Exits 2 on a bad config, before anything is compiled.
"""

from absl import flags, logging
from ml_collections import config_flags

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.cli import run_main
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.recipe import stages
from cwm_jax.recipe.schedule import run as run_recipe
from cwm_jax.train.config import check_values

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_COORD = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", -1, "This process's id.")
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_s",
  mesh_lib.HEARTBEAT_TIMEOUT_S,
  "Multi-process: a process silent this long counts as lost and the job exits non-zero.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax:
  """Drops orbax's INFO chatter so the progress line stays readable."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def _check_start_dirs(config, workdir: str) -> None:
  """A schedule stage that starts from a checkpoint directory finds one there (checked
  before any stage runs or corpus is built; a stage with checkpoints of its own resumes)."""
  if "schedule" not in config:
    return
  for st in stages.selected(config, stages.stages_from_config(config)):
    if (
      st.start_from in (stages.SCRATCH, stages.PREVIOUS)
      or stages.latest_step(storage.join(workdir, st.name, "checkpoints")) is not None
    ):
      continue
    if stages.latest_step(st.start_from) is None:
      raise ConfigError(
        f"schedule.stages.{st.name}.start_from={st.start_from!r} holds no "
        "committed checkpoint; point it at a run's checkpoints directory"
      )


def main(argv, hooks=()):
  """Runs the config (a schedule runs its stages); `hooks` run after every step."""
  if len(argv) > 1:
    raise ConfigError(
      f"unexpected arguments {argv[1:]}: every setting is a --flag or --config.FIELD=VALUE"
    )
  errors = check_values(_CONFIG.value)  # every field, before anything is built or created
  if errors:
    raise ConfigError("invalid training config: " + "; ".join(errors))
  if not storage.is_url(_WORKDIR.value) and storage.isfile(_WORKDIR.value):
    raise ConfigError(f"--workdir {_WORKDIR.value!r} is a file; pass a directory (new or a run's)")
  storage.check_writable(_WORKDIR.value)
  _check_start_dirs(_CONFIG.value, _WORKDIR.value)
  logging.get_absl_handler().addFilter(_QuietOrbax())
  mesh_lib.initialize_distributed(
    _COORD.value, _NPROC.value, _PID.value, heartbeat_timeout_s=_HEARTBEAT.value
  )
  run_recipe(_CONFIG.value, _WORKDIR.value, hooks)


def run():
  run_main(main, quiet=False)


if __name__ == "__main__":
  run()
