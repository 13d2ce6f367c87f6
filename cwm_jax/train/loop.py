"""The trainer: data -> sharded train_step -> metrics -> checkpoints.

`train(config, workdir)` resumes from `WORKDIR/checkpoints` if it holds a
checkpoint, else starts from `config.init_from` (params only, or params +
optimizer + step) or from scratch. Metrics of step n-1 are fetched after step
n is dispatched, so the host never waits on the device to log. SIGTERM (or a
multi-host preemption notice) saves a checkpoint and returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import jax
from flax import nnx
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from cwm_jax.checkpoint.manager import Checkpointer, model_config_to_dict
from cwm_jax.model.config import ModelConfig
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding
from cwm_jax.train import flops, optimizer, sources, state as state_lib, step as step_lib
from cwm_jax.train.config import execution_config, model_config, validate
from cwm_jax.train.metrics import MetricsWriter


@dataclasses.dataclass
class _Setup:
  mesh: jax.sharding.Mesh
  tx: object
  abstract: dict
  shardings: dict
  batch_sharding: NamedSharding
  step_fn: object
  init_fn: object


_SETUPS: dict = {}  # compiled steps reused by later train() calls with the same shapes


def _setup_key(config, cfg: ModelConfig, devices) -> str:
  parts = {k: config[k] for k in ("total_steps", "batch_size", "seq_len", "grad_accum",
                                  "seed")}
  for k in ("mesh", "optimizer", "loss", "compiler_options", "execution"):
    parts[k] = config[k].to_dict()
  ids = [d.id for d in (devices if devices is not None else jax.devices())]
  return json.dumps([parts, list(map(list, config.rules)), repr(cfg), ids], sort_keys=True,
                    default=str)


def _setup(config, cfg: ModelConfig, devices=None) -> _Setup:
  key = _setup_key(config, cfg, devices)
  if key not in _SETUPS:
    _SETUPS.clear()  # keep at most one compiled step alive
    _SETUPS[key] = _build(config, cfg, devices)
  return _SETUPS[key]


def step_parts(config, cfg: ModelConfig, mesh, compiler_options=None):
  """(tx, abstract state, state shardings, batch sharding, jitted train step) on `mesh`."""
  tx, schedule = optimizer.make_optimizer(config.optimizer, config.total_steps)
  run = execution_config(config)
  abstract = state_lib.abstract_state(cfg, tx, config.seed, run)
  shardings = state_lib.state_shardings(cfg, tx, config.rules, mesh, abstract)
  batch_sh = NamedSharding(mesh, sharding.batch_spec(config.rules))
  fn = step_lib.make_train_step(cfg, tx, schedule, grad_accum=config.grad_accum,
                                z_loss=config.loss.z_loss, loss_chunk=config.loss.chunk,
                                rules=sharding.normalize_rules(config.rules), execution=run)
  jitted = step_lib.jit_train_step(fn, shardings, batch_sh, compiler_options)
  return tx, abstract, shardings, batch_sh, jitted


def _build(config, cfg: ModelConfig, devices) -> _Setup:
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  options = _compiler_options(config)
  tx, abstract, shardings, batch_sh, step_fn = step_parts(config, cfg, mesh, options)
  init_fn = state_lib.jit_init(cfg, tx, config.seed, shardings, options,
                               execution_config(config))
  return _Setup(mesh, tx, abstract, shardings, batch_sh, step_fn, init_fn)


def _compiler_options(config) -> dict:
  return {k: v for k, v in config.compiler_options.items() if v != -1}


def _init_from(config, cfg: ModelConfig, s: _Setup) -> dict:
  """State from `config.init_from`: params only (fresh optimizer) or everything."""
  src = Checkpointer(config.init_from.path, max_to_keep=None, async_save=False)
  step = config.init_from.step if config.init_from.step >= 0 else src.latest_step()
  if step is None:
    raise FileNotFoundError(f"init_from.path={config.init_from.path!r} holds no checkpoint")
  target = state_lib.with_shardings(s.abstract, s.shardings)
  logging.info("initialising from %s step %d (params_only=%s)", config.init_from.path, step,
               config.init_from.params_only)
  if not config.init_from.params_only:
    out = src.restore(step, target)
  else:
    params = src.restore(step, {"params": target["params"]}, partial=True)["params"]
    fresh = lambda p: {"params": p, "opt_state": s.tx.init(p), "step": jax.numpy.zeros((), "int32"),
                       "rng": jax.random.key_data(jax.random.PRNGKey(config.seed))}
    out = jax.jit(fresh, out_shardings=s.shardings, donate_argnums=0)(params)
  src.close()
  return out


def _initial_state(config, cfg, s: _Setup, ckpt: Checkpointer, source) -> tuple[dict, int]:
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("resuming from %s step %d", ckpt.directory, latest)
    target = state_lib.with_shardings(s.abstract, s.shardings)
    return ckpt.restore(latest, target, data_iter=source), latest
  if config.init_from.path:
    state = _init_from(config, cfg, s)
    return state, int(state["step"])
  return s.init_fn(), 0


class _Preemption:
  """SIGTERM flag (one process) or JAX's preemption sync point (many)."""

  def __init__(self):
    self.flag, self._old = False, None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and exiting")
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _put(local: dict, sharding_: NamedSharding, global_shape) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding_, v, global_shape)
          for k, v in local.items()}


class _Logger:
  """Turns step-(n-1) device metrics into records once step n is dispatched."""

  def __init__(self, writer: MetricsWriter, cfg: ModelConfig, peak: float, start: int):
    self.writer, self.cfg, self.peak = writer, cfg, peak
    self.pending, self.records = None, []
    self.tokens = self.flops = 0.0
    self.t0, self.step0 = time.perf_counter(), start

  def count(self, local: dict) -> None:
    n = jax.process_count()  # processes hold equal shares of the batch
    self.tokens += n * float(np.count_nonzero(local["segment_ids"]))
    self.flops += n * flops.batch_flops(self.cfg, local["positions"], local["segment_ids"])

  def defer(self, step: int, metrics) -> None:
    self.flush()
    self.pending = (step, metrics, self.tokens, self.flops)
    self.tokens = self.flops = 0.0

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics, tokens, fl = self.pending
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    dt = max(now - self.t0, 1e-9)
    per_step = dt / max(step - self.step0, 1)
    scalars.update(tokens_per_sec=tokens / dt, step_time=per_step,
                   mfu=fl / dt / self.peak if self.peak else 0.0)
    self.t0, self.step0, self.pending = now, step, None
    self.writer.write(step, scalars)
    self.records.append({"step": step, **scalars})


def _evaluate(config, cfg: ModelConfig, params, step: int, writer: MetricsWriter) -> None:
  """Runs `cwm_jax.infer.evaluate` on the current params; logs `eval/*` at `step`."""
  from cwm_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from cwm_jax.infer.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  from cwm_jax.model.transformer import model_from_params  # pylint: disable=g-import-not-at-top
  path = config.data.get("tokenizer", "")
  tokenizer = Tokenizer.from_rank_file(path) if path else Tokenizer.default()
  with nnx.logical_axis_rules([tuple(r) for r in config.rules]):
    metrics = evaluate(model_from_params(cfg, params, execution_config(config)), tokenizer,
                       config.eval)
  writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})


def _peak(config, mesh) -> float:
  per_device = config.metrics.peak_flops or flops.peak_flops(mesh.devices.flat[0].device_kind)
  return per_device * mesh.devices.size


def train(config, workdir: str, devices=None) -> dict:
  """Trains until step `config.total_steps`; returns {'step', 'records', 'preempted'}.

  `devices` defaults to all devices of all processes. Raises ConfigError
  (before compiling anything) if the config does not fit the devices.
  """
  cfg = model_config(config)
  n_devices = len(devices) if devices is not None else jax.device_count()
  validate(config, cfg, n_devices, jax.process_count())
  sources.check_source(config)
  s = _setup(config, cfg, devices)
  source = sources.make_source(config, cfg, jax.process_index(), jax.process_count())
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=config.checkpoint.max_to_keep,
                      async_save=config.checkpoint.async_save)
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                         tensorboard=config.metrics.tensorboard, total_steps=config.total_steps)
  meta = {"model": model_config_to_dict(cfg), "config": config.to_dict()}
  preempt = _Preemption()
  try:
    with jax.set_mesh(s.mesh):
      state, step = _initial_state(config, cfg, s, ckpt, source)
      writer.truncate_after(step)
      log = _Logger(writer, cfg, _peak(config, s.mesh), step)
      saved, preempted = step, False
      global_shape = (config.batch_size, config.seq_len)
      while step < config.total_steps:
        local = next(source)
        log.count(local)
        state, metrics = s.step_fn(state, _put(local, s.batch_sharding, global_shape))
        step += 1
        if step % config.log_every == 0 or step == config.total_steps:
          log.defer(step, metrics)  # fetches the previous record, not this one
        if config.eval_every and step % config.eval_every == 0:
          log.flush()
          _evaluate(config, cfg, state["params"], step, writer)
        preempted = preempt.reached(step)
        if preempted or (config.checkpoint_every and step % config.checkpoint_every == 0):
          ckpt.save(step, state, data_iter=source, meta=meta)
          saved = step
        if preempted:
          break
        if config.debug.kill_at_step == step:
          ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
      log.flush()
      if saved != step:
        ckpt.save(step, state, data_iter=source, meta=meta)
      ckpt.wait()
  finally:
    preempt.close()
    ckpt.close()
    writer.close()
  return {"step": step, "records": log.records, "preempted": preempted}
