"""The RL stage: rollouts -> verifier rewards -> GRPO update, repeated.

`run(config, workdir)` takes an ordinary training config (`cwm_jax.train.config`)
plus an `rl` section (`rl_config()`); `batch_size` counts rollouts per update
(`batch_size / rl.group_size` prompts, each sampled `rl.group_size` times) and
`seq_len` bounds prompt + response. It reuses the trainer's pieces: the
optimizer, the sharded train state and its checkpoints, the metrics writer.
The state starts from `WORKDIR/checkpoints` (resume), else `init_from` (params
only: RL starts a fresh optimizer), else scratch. `rl.warmup_steps` first runs
supervised steps on the tasks' reference answers (the ordinary train step),
which gives a from-scratch smoke model something to reinforce.

Each logged step carries loss, grad_norm, lr, reward_mean, pass_rate,
clip_fraction, response_length, groups_kept (and reward_<kind>, ratio_mean,
approx_kl, stale_dropped, rollout_time, update_time). An iteration whose groups
all have zero advantage skips the optimizer (`skipped` 1) but counts as a step.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from cwm_jax.checkpoint.manager import Checkpointer, model_config_to_dict
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.base import ConfigError
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.transformer import abstract_model
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding
from cwm_jax.rl import grpo, rollout, tasks as tasks_lib
from cwm_jax.train import optimizer, state as state_lib, step as step_lib
from cwm_jax.train.config import execution_config, model_config, validate
from cwm_jax.train.metrics import MetricsWriter


def rl_config() -> ml_collections.ConfigDict:
  """Defaults of the `rl` config section. CWM's exact RL batch/LR figures are not public."""
  return ml_collections.ConfigDict(dict(
      tasks="toy,math,code,trace",  # kinds from cwm_jax.rl.tasks, or 'digits' (toy vocab)
      group_size=4,                 # G samples per prompt
      max_new_tokens=32,
      temperature=1.0, top_p=1.0,
      eps_low=grpo.EPS_LOW, eps_high=grpo.EPS_HIGH,
      loss_max_len=0,               # the fixed loss divisor; 0: max_new_tokens
      updates_per_rollout=1,        # optimizer steps on each rollout batch
      warmup_steps=0,               # supervised steps on reference answers first
      async_rollouts=False, max_staleness=1,
      verifier_workers=2, sandbox_timeout_s=3.0, sandbox_memory_mb=512))


def toy_config(steps: int, seed: int = 0) -> ml_collections.ConfigDict:
  """The learnable-from-scratch toy RL run: 16-token vocab, 'which digit' task."""
  from cwm_jax.train.config import base_config  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.seed = seed
  c.model.overrides.update(dict(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, head_dim=16,
                                ffn_dim=64, vocab_size=16, local_window=8, global_window=32))
  c.seq_len, c.batch_size, c.total_steps = 8, 128, steps
  c.checkpoint_every, c.checkpoint.async_save, c.metrics.tensorboard = 0, False, False
  c.optimizer.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
  c.mesh.update(data=-1, fsdp=1)
  c.rl = rl_config()
  c.rl.update(tasks="digits", group_size=8, max_new_tokens=1)
  return c


def validate_rl(config) -> None:
  rl, errors = config.rl, []
  if rl.group_size < 2:
    errors.append(f"rl.group_size={rl.group_size} must be >= 2 (advantages compare samples)")
  elif config.batch_size % rl.group_size:
    errors.append(f"batch_size={config.batch_size} (rollouts per update) is not divisible by "
                  f"rl.group_size={rl.group_size}")
  if not 1 <= rl.max_new_tokens < config.seq_len:
    errors.append(f"rl.max_new_tokens={rl.max_new_tokens} must be in [1, seq_len="
                  f"{config.seq_len})")
  if rl.temperature <= 0 or not 0 < rl.top_p <= 1:
    errors.append("rl.temperature must be > 0 (greedy groups carry no signal) and "
                  "0 < rl.top_p <= 1")
  if not (0 < rl.eps_low < 1 and rl.eps_high > 0):
    errors.append(f"need 0 < rl.eps_low < 1 and rl.eps_high > 0, got {rl.eps_low}, {rl.eps_high}")
  for name in ("updates_per_rollout", "verifier_workers"):
    if rl[name] < 1:
      errors.append(f"rl.{name}={rl[name]} must be >= 1")
  if rl.warmup_steps < 0 or rl.max_staleness < 0 or rl.loss_max_len < 0:
    errors.append("rl.warmup_steps, rl.max_staleness and rl.loss_max_len must be >= 0")
  if jax.process_count() > 1:
    errors.append("the RL loop runs on one process (rollouts are not split across hosts yet)")
  if errors:
    raise ConfigError("invalid RL config: " + "; ".join(errors))


@dataclasses.dataclass
class _Trainer:
  cfg: ModelConfig
  mesh: jax.sharding.Mesh
  tx: object
  abstract: dict
  shardings: dict
  batch_sharding: NamedSharding
  schedule: object
  rl_step: object
  sft_step: object
  graphdef: object


def _build(config, cfg: ModelConfig) -> _Trainer:
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  tx, schedule = optimizer.make_optimizer(config.optimizer, config.total_steps)
  run = execution_config(config)
  abstract = state_lib.abstract_state(cfg, tx, config.seed, run)
  shardings = state_lib.state_shardings(cfg, tx, config.rules, mesh, abstract)
  batch_sh = NamedSharding(mesh, sharding.batch_spec(config.rules))
  rules = sharding.normalize_rules(config.rules)
  options = dict(config.compiler_options)
  rl_fn = grpo.make_rl_step(cfg, tx, schedule, rules=rules,
                            max_len=config.rl.loss_max_len or config.rl.max_new_tokens,
                            eps_low=config.rl.eps_low, eps_high=config.rl.eps_high,
                            execution=run)
  sft_fn = step_lib.make_train_step(cfg, tx, schedule, rules=rules, execution=run)
  return _Trainer(cfg, mesh, tx, abstract, shardings, batch_sh, schedule,
                  grpo.jit_rl_step(rl_fn, shardings, batch_sh, options),
                  step_lib.jit_train_step(sft_fn, shardings, batch_sh, options),
                  nnx.split(abstract_model(cfg, run), nnx.Param)[0])


def _initial_state(config, t: _Trainer, ckpt: Checkpointer) -> tuple[dict, int]:
  """Resume, else params from `init_from` with a fresh optimizer, else a fresh state."""
  target = state_lib.with_shardings(t.abstract, t.shardings)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("resuming RL from %s step %d", ckpt.directory, latest)
    return ckpt.restore(latest, target), latest
  init = state_lib.jit_init(t.cfg, t.tx, config.seed, t.shardings)
  if not config.init_from.path:
    return init(), 0
  src = Checkpointer(config.init_from.path, max_to_keep=None, async_save=False)
  try:
    step = config.init_from.step if config.init_from.step >= 0 else src.latest_step()
    if step is None:
      raise ConfigError(f"init_from.path={config.init_from.path!r} holds no checkpoint")
    params = src.restore(step, {"params": target["params"]}, partial=True)["params"]
  finally:
    src.close()
  logging.info("RL starts from the params of %s step %d", config.init_from.path, step)
  return dict(init(), params=params), 0


def _sft_batch(tasks, rng, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """Prompt + reference answer per row (batch contract), loss on the answer only."""
  batch = {k: np.zeros((batch_size, seq_len), np.int32)
           for k in ("inputs", "targets", "positions", "segment_ids")}
  batch["weights"] = np.zeros((batch_size, seq_len), np.float32)
  for i, task in enumerate(rng.choice(tasks, size=batch_size)):
    ids = (list(task.prompt_ids) + list(task.reference_ids))[:seq_len + 1]
    n = len(ids) - 1
    batch["inputs"][i, :n], batch["targets"][i, :n] = ids[:-1], ids[1:]
    batch["positions"][i, :n], batch["segment_ids"][i, :n] = np.arange(n), 1
    batch["weights"][i, len(task.prompt_ids) - 1:n] = 1.0
  return batch


def _pick(tasks, config, step: int):
  n = config.batch_size // config.rl.group_size
  rng = np.random.default_rng([config.seed, step])
  return [tasks[i] for i in rng.choice(len(tasks), size=n, replace=n > len(tasks))]


class _Sampler:
  """Rollout batch of one step: pick prompts, sample groups with given params, score."""

  def __init__(self, config, t: _Trainer, tokenizer, tasks, scorer):
    self.config, self.t, self.tokenizer, self.tasks, self.scorer = (
        config, t, tokenizer, tasks, scorer)
    self.pad = max(len(task.prompt_ids) for task in tasks)  # one prompt shape: one compile

  def __call__(self, params, version: int):
    rl, t0 = self.config.rl, time.perf_counter()
    model = nnx.merge(self.t.graphdef, params)
    groups = rollout.collect(
        model, _pick(self.tasks, self.config, version), group_size=rl.group_size,
        max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
        stop_ids=self.tokenizer.stop_ids, decode=self.tokenizer.decode, scorer=self.scorer,
        seed=self.config.seed * 1_000_003 + version, version=version, pad_multiple=self.pad)
    batch, stats = rollout.make_batch(groups, self.config.seq_len)
    return batch, dict(stats, rollout_time=time.perf_counter() - t0)


class _Feed:
  """Rollout batches for policy version `step`: sampled now (sync) or by a background
  thread from a params snapshot (async, stale batches dropped)."""

  def __init__(self, config, sampler: _Sampler):
    self.sampler, self.async_ = sampler, None
    if config.rl.async_rollouts:
      self.async_ = rollout.AsyncRollouts(sampler, config.rl.max_staleness)

  def publish(self, params, step: int) -> None:
    if self.async_ is not None:  # a copy: the train step donates (frees) the state it is given
      self.async_.publish(jax.tree.map(jnp.copy, params), step)

  def get(self, params, step: int):
    if self.async_ is None:
      return self.sampler(params, step), 0
    sampled_at, out = self.async_.get(step)
    return out, step - sampled_at

  @property
  def dropped(self) -> int:
    return self.async_.dropped if self.async_ is not None else 0

  def close(self):
    if self.async_ is not None:
      self.async_.close()


def _rl_steps(config, t: _Trainer, feed: _Feed, state, step: int):
  """One rollout batch and its optimizer steps; yields (state, step, scalars) per step."""
  (batch, stats), staleness = feed.get(state["params"], step)
  stats.update(stale_dropped=feed.dropped, staleness=staleness)
  if stats["groups_kept"] == 0:  # no group carries signal: no update
    state = dict(state, step=state["step"] + 1)
    yield state, step + 1, dict(stats, loss=0.0, grad_norm=0.0, clip_fraction=0.0, skipped=1.0,
                                lr=float(t.schedule(step)))
    return
  device_batch = {k: jax.device_put(v, t.batch_sharding if v.ndim == 2 else NamedSharding(
      t.mesh, jax.sharding.PartitionSpec(t.batch_sharding.spec[0]))) for k, v in batch.items()}
  for _ in range(min(config.rl.updates_per_rollout, config.total_steps - step)):
    t0 = time.perf_counter()
    state, metrics = t.rl_step(state, device_batch)
    metrics = jax.device_get(metrics)
    step += 1
    feed.publish(state["params"], step)
    yield state, step, dict(stats, **metrics, update_time=time.perf_counter() - t0, skipped=0.0)


def run(config, workdir: str) -> dict:
  """Runs RL until step `config.total_steps`; returns {'step', 'records', 'preempted'}."""
  cfg = model_config(config)
  validate(config, cfg, jax.device_count(), jax.process_count())
  validate_rl(config)
  rl = config.rl
  limits = Limits(timeout_s=rl.sandbox_timeout_s, memory_mb=rl.sandbox_memory_mb,
                  output_bytes=100_000)
  tokenizer, tasks = tasks_lib.task_set(rl.tasks, max_prompt_len=config.seq_len
                                        - rl.max_new_tokens, seed=config.seed, limits=limits)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"rl.tasks={rl.tasks!r} needs vocab_size >= {tokenizer.vocab_size}, the "
                      f"model has {cfg.vocab_size}; set model.overrides.vocab_size")
  t = _build(config, cfg)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=config.checkpoint.max_to_keep,
                      async_save=config.checkpoint.async_save)
  writer = MetricsWriter(workdir, tensorboard=config.metrics.tensorboard,
                         total_steps=config.total_steps)
  scorer = rollout.Scorer(rl.verifier_workers)
  meta = {"model": model_config_to_dict(cfg), "config": config.to_dict()}
  feed, records = None, []
  try:
    with jax.set_mesh(t.mesh):
      state, step = _initial_state(config, t, ckpt)
      writer.truncate_after(step)
      feed = _Feed(config, _Sampler(config, t, tokenizer, tasks, scorer))
      feed.publish(state["params"], step)
      saved = step
      while step < config.total_steps:
        for state, step, scalars in _iteration(config, t, feed, state, step, tasks):
          writer.write(step, scalars)
          records.append({"step": step, **scalars})
          if config.checkpoint_every and step % config.checkpoint_every == 0:
            ckpt.save(step, state, meta=meta)
            saved = step
      if saved != step:
        ckpt.save(step, state, meta=meta)
      ckpt.wait()
  finally:
    for closer in (feed, scorer, ckpt, writer):
      if closer is not None:
        closer.close()
  return {"step": step, "records": records, "preempted": False}


def _iteration(config, t: _Trainer, feed: _Feed, state, step: int, tasks):
  """A supervised warmup step while step < rl.warmup_steps, else a rollout's RL steps."""
  if step >= config.rl.warmup_steps:
    yield from _rl_steps(config, t, feed, state, step)
    return
  rng = np.random.default_rng([config.seed, step, 1])
  batch = _sft_batch(tasks, rng, config.batch_size, config.seq_len)
  state, metrics = t.sft_step(state, {k: jax.device_put(v, t.batch_sharding)
                                      for k, v in batch.items()})
  step += 1
  feed.publish(state["params"], step)
  yield state, step, {"warmup": 1.0, **jax.device_get(metrics)}
