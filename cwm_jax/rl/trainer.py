"""The RL trainer: rollouts -> verifier rewards -> GRPO update, on the training runtime.

`run(config, workdir)` takes an ordinary training config (`cwm_jax.train.config`)
plus an `rl` section (`rl_config()`); `batch_size` counts rollouts per update
(`batch_size / rl.group_size` prompts, each sampled `rl.group_size` times) and
`seq_len` bounds prompt + response. The runtime (`cwm_jax.train.runtime`) gives
it what the LM trainer has: the mesh and sharded state, resume, `init_from`
(set `init_from.params_only`: RL normally starts a fresh optimizer), SIGTERM
save, the checkpoint cadence and non-blocking metrics. `rl.warmup_steps` first
runs supervised steps on the tasks' reference answers (the ordinary train
step), which gives a from-scratch smoke model something to reinforce. In-flight
async rollouts are dropped at a save: a resumed run samples afresh from the
restored params.

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

from cwm_jax.base import ConfigError
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.model.transformer import abstract_model
from cwm_jax.rl import grpo, rollout, tasks as tasks_lib
from cwm_jax.train import config as config_lib, runtime, step as step_lib


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
  c = config_lib.base_config()
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


def validate(config, n_devices: int | None = None) -> None:
  """Every check `run` makes before compiling: the training config, then the `rl` section
  (unknown `rl` fields are errors)."""
  config_lib.validate(config, config_lib.model_config(config), n_devices or jax.device_count(),
                      jax.process_count())
  rl, errors = config.rl, []
  unknown = sorted(set(rl.keys()) - set(rl_config().keys()))
  if unknown:
    errors.append(f"unknown rl fields {unknown}; known: {sorted(rl_config().keys())}")
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

  def __init__(self, config, graphdef, tokenizer, tasks, scorer):
    self.config, self.graphdef, self.tokenizer, self.tasks, self.scorer = (
        config, graphdef, tokenizer, tasks, scorer)
    self.pad = max(len(task.prompt_ids) for task in tasks)  # one prompt shape: one compile

  def __call__(self, params, version: int):
    rl, t0 = self.config.rl, time.perf_counter()
    model = nnx.merge(self.graphdef, params)
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


class RLTrainer:
  """Supervised warmup steps, then rollout batches and their GRPO steps."""

  data_iter = None  # tasks are drawn by step number: resuming needs no iterator state

  def __init__(self, rt: runtime.Runtime, tokenizer, tasks):
    self.rt, config = rt, rt.config
    self.config, self.tasks = config, tasks
    rl = config.rl
    self.rl_step = rt.cached("rl_step", lambda: grpo.jit_rl_step(grpo.make_rl_step(
        rt.cfg, rt.tx, rt.schedule, rules=rt.rules,
        max_len=rl.loss_max_len or rl.max_new_tokens, eps_low=rl.eps_low,
        eps_high=rl.eps_high, execution=rt.execution), rt.shardings, rt.batch_sharding,
        rt.compiler_options))
    self.sft_step = rt.cached("sft_step", lambda: step_lib.jit_train_step(
        step_lib.make_train_step(rt.cfg, rt.tx, rt.schedule, rules=rt.rules,
                                 execution=rt.execution),
        rt.shardings, rt.batch_sharding, rt.compiler_options))
    graphdef = nnx.split(abstract_model(rt.cfg, rt.execution), nnx.Param)[0]
    self.scorer = rollout.Scorer(rl.verifier_workers)
    self.feed = _Feed(config, _Sampler(config, graphdef, tokenizer, tasks, self.scorer))
    self.published = None

  def iterate(self, state: dict, step: int):
    if self.published is None:
      self.feed.publish(state["params"], step)
      self.published = step
    if step < self.config.rl.warmup_steps:
      yield self._warmup(state, step)
    else:
      yield from self._rl_steps(state, step)

  def _warmup(self, state, step: int) -> runtime.Update:
    config = self.config
    rng = np.random.default_rng([config.seed, step, 1])
    batch = _sft_batch(self.tasks, rng, config.batch_size, config.seq_len)
    state, metrics = self.sft_step(state, {k: jax.device_put(v, self.rt.batch_sharding)
                                           for k, v in batch.items()})
    self.feed.publish(state["params"], step + 1)
    return runtime.Update(state, step + 1, dict(metrics, warmup=1.0))

  def _rl_steps(self, state, step: int):
    """One rollout batch and its optimizer steps."""
    rt, config = self.rt, self.config
    (batch, stats), staleness = self.feed.get(state["params"], step)
    stats.update(stale_dropped=self.feed.dropped, staleness=staleness)
    if stats["groups_kept"] == 0:  # no group carries signal: no update
      state = dict(state, step=state["step"] + 1)
      yield runtime.Update(state, step + 1, dict(stats, loss=0.0, grad_norm=0.0,
                                                 clip_fraction=0.0, skipped=1.0,
                                                 lr=float(rt.schedule(step))))
      return
    row = NamedSharding(rt.mesh, jax.sharding.PartitionSpec(rt.batch_sharding.spec[0]))
    device_batch = {k: jax.device_put(v, rt.batch_sharding if v.ndim == 2 else row)
                    for k, v in batch.items()}
    for _ in range(min(config.rl.updates_per_rollout, config.total_steps - step)):
      t0 = time.perf_counter()
      state, metrics = self.rl_step(state, device_batch)
      step += 1
      self.feed.publish(state["params"], step)
      yield runtime.Update(state, step, dict(stats, **metrics, skipped=0.0,
                                             update_time=time.perf_counter() - t0))

  def close(self) -> None:
    self.feed.close()
    self.scorer.close()


def run(config, workdir: str, hooks=()) -> dict:
  """Runs RL until step `config.total_steps`; returns {'step', 'records', 'preempted'}."""
  validate(config)
  rl, cfg = config.rl, config_lib.model_config(config)
  limits = Limits(timeout_s=rl.sandbox_timeout_s, memory_mb=rl.sandbox_memory_mb,
                  output_bytes=100_000)
  tokenizer, tasks = tasks_lib.task_set(rl.tasks, max_prompt_len=config.seq_len
                                        - rl.max_new_tokens, seed=config.seed, limits=limits)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"rl.tasks={rl.tasks!r} needs vocab_size >= {tokenizer.vocab_size}, the "
                      f"model has {cfg.vocab_size}; set model.overrides.vocab_size")
  rt = runtime.setup(config)
  return runtime.run(rt, workdir, RLTrainer(rt, tokenizer, tasks), hooks)
