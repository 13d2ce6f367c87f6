"""The LM trainer: packed token batches -> the sharded train step, on the runtime.

`train(config, workdir)` is the language-model trainer of every pre-train,
mid-train and SFT stage: a batch source (`cwm_jax.train.sources`: synthetic or
the grain pipeline, checkpointed with the state) and the jitted
`train_step(state, batch)` of `cwm_jax.train.step`; the runtime
(`cwm_jax.train.runtime`) does the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from cwm_jax.parallel import rows, sharding
from cwm_jax.train import flops, runtime, sources
from cwm_jax.train import state as state_lib
from cwm_jax.train import step as step_lib
from cwm_jax.train.config import execution_config, model_config
from cwm_jax.train.config import validate as validate_run


def step_parts(config, cfg, mesh, compiler_options=None):
  """(tx, abstract state, state shardings, batch sharding, jitted train step) on `mesh`.

  The planner compiles exactly this step for simulated or TPU devices."""
  p = state_lib.parts(config, cfg, mesh)
  fn = _train_step(config, cfg, p.tx, p.schedule)
  return (
    p.tx,
    p.abstract,
    p.shardings,
    p.batch_sharding,
    step_lib.jit_train_step(fn, p.shardings, p.batch_sharding, compiler_options),
  )


def _train_step(config, cfg, tx, schedule):
  return step_lib.make_train_step(
    cfg,
    tx,
    schedule,
    grad_accum=config.grad_accum,
    z_loss=config.loss.z_loss,
    loss_chunk=config.loss.chunk,
    rules=sharding.normalize_rules(config.rules),
    execution=execution_config(config),
  )


class LMTrainer:
  """Next batch from the source, one jitted train step."""

  def __init__(self, rt: runtime.Runtime):
    self.rt, config = rt, rt.config
    self.step_fn = rt.cached(
      "lm_step",
      lambda: step_lib.jit_train_step(
        _train_step(config, rt.cfg, rt.tx, rt.schedule),
        rt.shardings,
        rt.batch_sharding,
        rt.compiler_options,
      ),
    )
    self.data_iter = sources.make_source(config, rt.cfg, jax.process_index(), jax.process_count())
    self.batch_size = config.batch_size  # global; this process loads its share of the rows

  def iterate(self, state: dict, step: int) -> Iterator[runtime.Update]:
    t = time.perf_counter()
    local = next(self.data_iter)
    data_s = time.perf_counter() - t
    n = jax.process_count()  # processes hold equal shares of the batch
    tokens = n * float(np.count_nonzero(local["segment_ids"]))
    fl = n * flops.batch_flops(self.rt.cfg, local["positions"], local["segment_ids"])
    batch = rows.global_batch(local, self.rt.batch_sharding, self.batch_size)
    state, metrics = self.step_fn(state, batch)
    yield runtime.Update(state, step + 1, metrics, tokens, fl, data_s)

  def close(self) -> None:
    pass


def validate(config, n_devices: int | None = None) -> None:
  """Every check `train` makes before compiling (ConfigError names the field)."""
  validate_run(config, model_config(config), n_devices or jax.device_count(), jax.process_count())
  sources.check_source(config)


def train(config, workdir: str, devices=None, hooks: Sequence[runtime.Hook] = ()) -> dict:
  """Trains until step `config.total_steps`; returns {'step', 'records', 'preempted'}.

  `devices` defaults to all devices of all processes. Raises ConfigError
  (before compiling anything) if the config does not fit the devices.
  """
  sources.check_source(config)
  rt = runtime.setup(config, devices)
  return runtime.run(rt, workdir, LMTrainer(rt), hooks)
