"""Running a recipe: the stages of a schedule in order, or one plain training run.

`run(config, workdir)` is what `python -m cwm_jax.train` calls. A schedule
config (`schedule` section, see `cwm_jax.recipe.stages`) runs its selected
stages in order, each in `WORKDIR/NAME/` with the trainer it names
(`cwm_jax.recipe.trainers`), then the optional finish (export + sample);
any other config runs once. Everything is resumable: a finished stage is
skipped, an unfinished one resumes from its checkpoints.

Data mixtures may name the embedded corpora (`{kind: 'corpus', name: 'code',
limit: N, weight: W}`): before the first stage runs, those of the selected
stages are built once into `WORKDIR/data/NAME/` (kept across stages and
resumes), and each stage reads that folder's array_record files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import logging

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.data import corpus_build
from cwm_jax.recipe import finish, trainers
from cwm_jax.recipe import stages as stages_lib
from cwm_jax.train import runtime


def run_schedule(config, workdir: str, hooks: Sequence[runtime.Hook] = ()) -> dict[str, Any]:
  """Runs the selected stages in order, each in `workdir/NAME`; resumable at any point.

  A finished stage (its checkpoint at the stage's last step exists) is
  skipped; an unfinished one resumes from its own checkpoints, or starts from
  its `start_from`. Returns {stage name: train() result or 'done'}.
  """
  results: dict[str, Any] = {}
  planned = stages_lib.plan_stages(config, workdir)  # every stage valid before any work
  prepare_data(config, workdir)
  for st, sc in planned:
    stage_dir = storage.join(workdir, st.name)
    done = stages_lib.latest_step(storage.join(stage_dir, "checkpoints"))
    if done is not None and done >= sc.total_steps:
      logging.info("stage %s: finished (step %d), skipping", st.name, done)
      results[st.name] = "done"
      continue
    if sc.init_from.path and done is None:
      _check_start(st, sc)
    sc = with_corpora(sc, workdir)
    logging.info(
      "stage %s: steps %d..%d, seq_len %d, rope_scaling %s, init_from %s",
      st.name,
      sc.stage.first_step,
      sc.total_steps,
      sc.seq_len,
      sc.model.overrides.rope_scaling is not None,
      sc.init_from.path or "scratch",
    )
    out = trainers.TRAINERS[st.trainer].run(sc, stage_dir, hooks)
    results[st.name] = out
    if out.get("preempted"):
      break
  return results


def _names_corpora(config) -> bool:
  mixture = config.data.get("mixture")
  return isinstance(mixture, (list, tuple)) and any(
    dict(m).get("kind") == "corpus" for m in mixture
  )


def prepare_data(config, workdir: str) -> None:
  """Builds the corpora the selected stages name. Runs before JAX starts its
  threads: the trace builder forks sandboxed interpreters."""
  stages = stages_lib.stages_from_config(config)
  for st in stages_lib.selected(config, stages):
    try:
      with_corpora(stages_lib.stage_config(config, stages.index(st), workdir), workdir)
    except ConfigError as e:
      raise ConfigError(f"stage {st.name}: {e}") from e


def with_corpora(config, workdir: str):
  """`config` with its embedded-corpus mixture entries built into
  `workdir/data/NAME` and replaced by array_record sources."""
  if not _names_corpora(config):
    return config
  config.data.mixture = corpus_build.resolve_corpora(
    config.data.mixture, storage.join(workdir, "data")
  )
  return config


def _check_start(st: stages_lib.Stage, sc) -> None:
  step = stages_lib.latest_step(sc.init_from.path)
  want = sc.init_from.step
  if step is None or (want >= 0 and step < want):
    raise ConfigError(
      f"stage {st.name} starts from {sc.init_from.path} step {want}, which does "
      "not exist yet; run the previous stage first (or set "
      f"schedule.stages.{st.name}.start_from to a checkpoint directory)"
    )


def run(config, workdir: str, hooks: Sequence[runtime.Hook] = ()) -> dict[str, Any]:
  """`python -m cwm_jax.train`: a schedule config runs its stages (then `finish`), any
  other config runs once with the trainer it names (`config.trainer`, default 'lm')."""
  if "schedule" in config:
    results = run_schedule(config, workdir, hooks)
    results.update(finish.after_schedule(config, workdir, results))
    return results
  trainer = trainers.TRAINERS.get(config.get("trainer", "lm"))
  if trainer is None:
    raise ConfigError(f"trainer={config.trainer!r} must be one of {sorted(trainers.TRAINERS)}")
  return trainer.run(with_corpora(config, workdir), workdir, hooks)
