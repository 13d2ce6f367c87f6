"""The training runtime: one loop under every trainer.

A trainer (the LM trainer in `cwm_jax.train.lm`, the RL trainer in
`cwm_jax.rl.trainer`) is a step function plus a batch source; everything else
lives here, once:

- `setup`: validates the config against the devices (`ConfigError` before
  anything compiles), builds the mesh, the optimizer, the abstract train state,
  its shardings and the jitted sharded initializer (no host ever holds the
  whole model); cached, so a later run with the same shapes reuses it;
- `run`: the initial state (resume from the newest committed checkpoint of
  `WORKDIR/checkpoints` that restores, falling back past corrupt ones unless
  `checkpoint.on_corrupt='fail'`, else `init_from`, params only or everything,
  else scratch), the step loop,
  metrics of step n-1 fetched after step n is dispatched (the host never waits
  on the device to log), hooks (in-loop evaluation) after each step, the
  checkpoint cadence (state + the trainer's data iterator + metadata), the
  non-finite guard and bad-record counts (`cwm_jax.train.health`), and
  SIGTERM (or a multi-host preemption notice): save, then return.

A trainer yields `Update`s; one `iterate` call may yield several (an RL
rollout feeds several optimizer steps).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint.manager import (
  Checkpointer,
  CorruptCheckpoint,
  complete_steps,
  model_config_to_dict,
  step_dirs,
)
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding
from cwm_jax.train import flops, health, observe
from cwm_jax.train import state as state_lib
from cwm_jax.train.config import model_config, validate
from cwm_jax.train.health import Guard
from cwm_jax.train.metrics import MetricsWriter


@dataclasses.dataclass
class Runtime:
  """What every trainer builds on: the model, the mesh and the sharded train state."""

  config: Any
  cfg: ModelConfig
  execution: Execution
  mesh: jax.sharding.Mesh
  tx: Any
  schedule: Callable
  abstract: dict
  shardings: dict
  batch_sharding: NamedSharding
  init_fn: Callable
  compiler_options: dict
  cache: dict = dataclasses.field(default_factory=dict)  # the trainers' jitted steps

  @property
  def rules(self):
    return sharding.normalize_rules(self.config.rules)

  def cached(self, name: str, build: Callable[[], Any]) -> Any:
    """`build()` once per runtime (a jitted step survives later runs of the same shapes)."""
    if name not in self.cache:
      self.cache[name] = build()
    return self.cache[name]


@dataclasses.dataclass
class Update:
  """One optimizer step: the new state, its step, and what to log about it.

  `metrics` may hold device arrays: they are fetched one update later.
  `tokens` / `flops` (host numbers) feed the throughput and MFU figures; `data_s` is
  the time the trainer waited for its batch (goodput's data bucket).
  """

  state: dict
  step: int
  metrics: dict
  tokens: float = 0.0
  flops: float = 0.0
  data_s: float = 0.0


class Trainer(Protocol):
  """A step function plus a batch source on top of a `Runtime`."""

  data_iter: Any  # checkpointed with the state (a grain iterator), or None

  def iterate(self, state: dict, step: int) -> Iterator[Update]: ...

  def close(self) -> None: ...


@dataclasses.dataclass
class HookContext:
  step: int
  state: dict
  runtime: Runtime
  checkpointer: Checkpointer


# A hook runs after every step; it returns metrics to log at that step, or None.
Hook = Callable[[HookContext], "dict[str, float] | None"]

_RUNTIMES: dict = {}  # at most one setup kept alive (its compiled steps are reused)


def _setup_key(config, cfg: ModelConfig, devices) -> str:
  parts = {k: config[k] for k in ("total_steps", "batch_size", "seq_len", "grad_accum", "seed")}
  for k in ("mesh", "optimizer", "loss", "compiler_options", "execution"):
    parts[k] = config[k].to_dict()
  for k in ("rl",):
    if k in config:
      parts[k] = config[k].to_dict()
  ids = [d.id for d in (devices if devices is not None else jax.devices())]
  return json.dumps(
    [parts, list(map(list, config.rules)), repr(cfg), ids], sort_keys=True, default=str
  )


def setup(config, devices=None) -> Runtime:
  """Validates `config` for the devices, then builds (or reuses) its runtime."""
  cfg = model_config(config)
  n_devices = len(devices) if devices is not None else jax.device_count()
  validate(config, cfg, n_devices, jax.process_count())
  key = _setup_key(config, cfg, devices)
  if key not in _RUNTIMES:
    _RUNTIMES.clear()
    _RUNTIMES[key] = _build(config, cfg, devices)
  rt = _RUNTIMES[key]
  rt.config = config  # same shapes; fields such as workdir-relative paths may differ
  return rt


def _build(config, cfg: ModelConfig, devices) -> Runtime:
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  options = {k: v for k, v in config.compiler_options.items() if v != -1}
  p = state_lib.parts(config, cfg, mesh)
  init_fn = state_lib.jit_init(cfg, p.tx, config.seed, p.shardings, options, p.execution)
  return Runtime(
    config,
    cfg,
    p.execution,
    mesh,
    p.tx,
    p.schedule,
    p.abstract,
    p.shardings,
    p.batch_sharding,
    init_fn,
    options,
  )


def check_init_from(config) -> int:
  """The step `config.init_from` names, checked without creating anything (ConfigError)."""
  path, want = config.init_from.path, config.init_from.step
  found = complete_steps(path)
  if not found or (want >= 0 and want not in found):
    raise ConfigError(
      f"init_from.path={path!r} holds no committed checkpoint"
      f"{f' at step {want}' if want >= 0 else ''} (committed steps: {found}); "
      "point it at a checkpoints directory of a finished run"
    )
  return want if want >= 0 else found[-1]


def _init_from(rt: Runtime) -> dict:
  """State from `config.init_from`: params only (fresh optimizer) or everything."""
  config = rt.config
  step = check_init_from(config)
  src = Checkpointer(config.init_from.path, max_to_keep=None, async_save=False, create=False)
  try:
    target = state_lib.with_shardings(rt.abstract, rt.shardings)
    logging.info(
      "initialising from %s step %d (params_only=%s)",
      config.init_from.path,
      step,
      config.init_from.params_only,
    )
    if not config.init_from.params_only:
      return src.restore(step, target)
    params = src.restore(step, {"params": target["params"]}, partial=True)["params"]
  finally:
    src.close()
  fresh = lambda p: {
    "params": p,
    "opt_state": rt.tx.init(p),
    "step": jax.numpy.zeros((), "int32"),
    "rng": jax.random.key_data(jax.random.PRNGKey(config.seed)),
  }
  return jax.jit(fresh, out_shardings=rt.shardings, donate_argnums=0)(params)


def _resume(rt: Runtime, ckpt: Checkpointer, data_iter) -> tuple[dict, int] | None:
  """The newest committed checkpoint that restores; with `checkpoint.on_corrupt='fallback'`
  a corrupt one is reported, set aside and the previous one tried."""
  steps = ckpt.complete_steps()
  fallback = rt.config.checkpoint.get("on_corrupt", "fallback") == "fallback"
  target = state_lib.with_shardings(rt.abstract, rt.shardings)
  for i in range(len(steps) - 1, -1, -1):
    try:
      logging.info("resuming from %s step %d", ckpt.directory, steps[i])
      state = ckpt.restore(steps[i], target, data_iter=data_iter)
    except CorruptCheckpoint as e:
      if not fallback:
        raise ConfigError(
          f"{e} (checkpoint.on_corrupt=fail; set it to 'fallback' to resume "
          "from the previous checkpoint)"
        ) from None
      logging.warning("%s; trying the previous checkpoint", e)
      continue
    _set_aside_after(ckpt, steps[i])
    return state, steps[i]
  if steps:
    raise ConfigError(
      f"no checkpoint under {ckpt.directory} restores (steps {steps}); "
      "restore one, or start a new workdir"
    )
  _set_aside_after(ckpt, -1)
  return None


def _set_aside_after(ckpt: Checkpointer, step: int) -> None:
  """Step directories after `step` (corrupt, or never committed) are renamed aside so the
  resumed run can save those steps again."""
  later = [int(n) for n in step_dirs(ckpt.directory) if int(n) > step]
  if later and jax.process_index() == 0:
    for path in ckpt.set_aside(sorted(later)):
      logging.warning("set aside %s (corrupt or incomplete checkpoint)", path)


def initial_state(rt: Runtime, ckpt: Checkpointer, data_iter=None) -> tuple[dict, int]:
  """Resume from `ckpt`, else `init_from`, else a fresh sharded state."""
  resumed = _resume(rt, ckpt, data_iter)
  if resumed is not None:
    return resumed
  if rt.config.init_from.path:
    state = _init_from(rt)
    return state, int(state["step"])
  return rt.init_fn(), 0


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


def check_workdir(config, workdir: str) -> None:
  """A workdir that is not a directory, or a fresh run whose `init_from` names no
  checkpoint, is a ConfigError before anything is created."""
  # A bucket prefix may share its name with an object: only a local path can be "a file".
  if not storage.is_url(workdir) and storage.isfile(workdir):
    raise ConfigError(f"--workdir {workdir!r} is a file; pass a directory (new or a run's)")
  if not complete_steps(storage.join(workdir, "checkpoints")) and config.init_from.path:
    check_init_from(config)


class _Logger:
  """Turns step-(n-1) metrics into records once step n is dispatched; checks them (the
  guard) and adds the data iterator's bad-record counts."""

  def __init__(
    self,
    writer: MetricsWriter,
    peak: float,
    start: int,
    guard: Guard,
    data_iter=None,
    goodput: observe.Goodput | None = None,
    total: int = 0,
  ):
    self.guard, self.data_iter, self.goodput, self.total = guard, data_iter, goodput, total
    self.writer, self.peak = writer, peak
    self.pending, self.records = None, []
    self.tokens = self.flops = 0.0
    self.t0, self.step0 = time.perf_counter(), start

  def count(self, update: Update) -> None:
    self.tokens += update.tokens
    self.flops += update.flops

  def defer(self, step: int, metrics) -> None:
    self.flush()
    self.pending = (step, metrics, self.tokens, self.flops)
    self.tokens = self.flops = 0.0

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics, tokens, fl = self.pending
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars.update(health.bad_record_scalars(self.data_iter))
    stop = self.guard.observe(step, scalars)
    if self.guard.skipped:
      scalars["nonfinite_steps"] = float(self.guard.skipped)
    now = time.perf_counter()
    dt = max(now - self.t0, 1e-9)
    if tokens:
      step_time = dt / max(step - self.step0, 1)
      scalars.update(
        tokens_per_sec=tokens / dt,
        step_time=step_time,
        mfu=fl / dt / self.peak if self.peak else 0.0,
        eta_s=observe.eta_seconds(step, self.total, step_time),
      )
    if self.goodput is not None:
      scalars.update(self.goodput.interval())
      self.goodput.save(if_due=True)  # a relaunch after a crash learns how far it got
    scalars.update(observe.memory_scalars())
    self.t0, self.step0, self.pending = now, step, None
    self.write(step, scalars)  # logged before the guard stops the run
    if stop is not None:
      raise stop

  def check_now(self, step: int, metrics) -> None:
    """Before a save: step's loss / grad norm checked now (logged, then NonFiniteError)."""
    if self.pending is not None and self.pending[0] == step:
      self.flush()
      return
    scalars = host_scalars(metrics)
    stop = self.guard.observe(step, scalars)
    if stop is not None:
      self.flush()
      self.write(step, {**scalars, "nonfinite_steps": float(self.guard.skipped)})
      raise stop

  def write(self, step: int, scalars: dict) -> None:
    self.writer.write(step, scalars)
    self.records.append({"step": step, **scalars})


def _peak(config, mesh) -> float:
  per_device = config.metrics.peak_flops or flops.peak_flops(mesh.devices.flat[0].device_kind)
  return per_device * mesh.devices.size


def run(rt: Runtime, workdir: str, trainer: Trainer, hooks: Sequence[Hook] = ()) -> dict:
  """Runs `trainer` until step `config.total_steps`; returns {'step', 'records',
  'preempted', 'goodput'} (goodput: this workdir's launches so far, summed)."""
  config = rt.config
  check_workdir(config, workdir)  # before anything is created
  ckpt = Checkpointer(
    storage.join(workdir, "checkpoints"),
    max_to_keep=config.checkpoint.max_to_keep,
    async_save=config.checkpoint.async_save,
  )
  primary = jax.process_index() == 0
  m = config.metrics
  writer = MetricsWriter(
    workdir,
    enabled=primary,
    tensorboard=m.tensorboard,
    total_steps=config.total_steps,
    flush_every_s=m.get("flush_every_s", 60.0),
    wandb_project=m.get("wandb_project", ""),
    wandb_mode=m.get("wandb_mode", "online"),
    run_config=config.to_dict(),
  )
  goodput = observe.Goodput(workdir, enabled=primary, save_every_s=m.get("flush_every_s", 60.0))
  prof = config.get("profile", {})
  profiler = observe.Profiler(workdir, prof.get("start_step", -1), prof.get("num_steps", 5))
  meta = {"model": model_config_to_dict(rt.cfg), "config": config.to_dict()}
  preempt = _Preemption()

  def save(step, state):
    with goodput.timed("save"):
      writer.flush()  # the records up to a checkpoint are durable before it is
      goodput.save()
      ckpt.save(step, state, data_iter=trainer.data_iter, meta=meta)

  try:
    with jax.set_mesh(rt.mesh):
      with goodput.timed("restore" if ckpt.complete_steps() else "startup"):
        state, step = initial_state(rt, ckpt, trainer.data_iter)
      goodput.resumed(step)
      writer.truncate_after(step)
      log = _Logger(
        writer,
        _peak(config, rt.mesh),
        step,
        Guard(config.optimizer.get("skip_nonfinite", 0), ckpt),
        trainer.data_iter,
        goodput,
        config.total_steps,
      )
      saved, preempted = step, False
      while step < config.total_steps and not preempted:
        profiler.before_step(step, check_request=step % config.log_every == 0)
        for update in trainer.iterate(state, step):
          state, step = update.state, update.step
          goodput.add("data", update.data_s)
          goodput.last_step = step
          log.count(update)
          if step % config.log_every == 0 or step == config.total_steps:
            log.defer(step, update.metrics)  # fetches the previous record, not this one
          preempted = preempt.reached(step)
          if preempted or (config.checkpoint_every and step % config.checkpoint_every == 0):
            log.check_now(step, update.metrics)  # never save a diverged state
            save(step, state)
            saved = step
          with goodput.timed("eval"):
            _run_hooks(hooks, HookContext(step, state, rt, ckpt), log)
          profiler.after_step(step, lambda: jax.block_until_ready(state))
          if preempted or step >= config.total_steps:
            break
      log.flush()
      if saved != step:
        log.check_now(step, update.metrics)
        save(step, state)
      with goodput.timed("save"):
        ckpt.wait()
      summary = goodput.summary()
      goodput.save()
      logging.info(
        "goodput over %d launch(es): %.1f%% of %.1f s (%s)",
        summary["launches"],
        100 * summary["goodput"],
        summary["wall_s"],
        ", ".join(f"{k} {v:.1f} s" for k, v in summary["buckets"].items())
        + f", lost {summary['lost_s']:.1f} s",
      )
  finally:
    profiler.close()
    goodput.close()
    preempt.close()
    trainer.close()
    ckpt.close()
    writer.close()
  return {"step": step, "records": log.records, "preempted": preempted, "goodput": summary}


def _run_hooks(hooks: Sequence[Hook], ctx: HookContext, log: _Logger) -> None:
  for hook in hooks:
    out = hook(ctx)
    if out:
      log.flush()
      log.write(ctx.step, out)


def host_scalars(metrics: dict) -> dict[str, float]:
  """Device metrics as Python floats (for trainers that need them on the host now)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
