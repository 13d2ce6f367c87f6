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
approx_kl, stale_dropped, rollout_time, and update_time: the previous update's seconds from
dispatch to done, measured without blocking the loop). An iteration whose groups
all have zero advantage skips the optimizer (`skipped` 1) but counts as a step.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from cwm_jax import storage
from cwm_jax.base import ConfigError, unknown_fields
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.data.traces import isolation
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer.rewards import Reward
from cwm_jax.infer.sampler import Turns, generate_slots
from cwm_jax.model.transformer import abstract_model
from cwm_jax.parallel import rows as rows_lib
from cwm_jax.parallel import sharding, transfer
from cwm_jax.rl import datasets, episodes, grpo, rollout
from cwm_jax.rl import tasks as tasks_lib
from cwm_jax.train import config as config_lib
from cwm_jax.train import runtime
from cwm_jax.train import step as step_lib


def rl_config() -> ml_collections.ConfigDict:
  """Defaults of the `rl` config section. CWM's exact RL batch/LR figures are not public."""
  return ml_collections.ConfigDict(
    dict(
      tasks="toy,math,code,trace",  # kinds from cwm_jax.rl.tasks, or 'digits' (toy vocab)
      task_files="",  # comma-separated task files, folders or globs, local or
      # gs:// (rl.datasets);
      # replaces `tasks`; a bare name is a shipped set
      # (cwm_jax/rl/task_sets/NAME.jsonl)
      max_turns=4,  # policy messages per multi-turn (tool) episode
      episode_tokens=0,  # tokens per multi-turn episode; 0: seq_len
      episode_seconds=120.0,  # wall time of one batch of multi-turn episodes
      group_size=4,  # G samples per prompt
      max_new_tokens=32,
      temperature=1.0,
      top_p=1.0,
      eps_low=grpo.EPS_LOW,
      eps_high=grpo.EPS_HIGH,
      loss_max_len=0,  # the fixed loss divisor; 0: max_new_tokens
      updates_per_rollout=1,  # optimizer steps on each rollout batch
      warmup_steps=0,  # supervised steps on reference answers first
      async_rollouts=False,
      max_staleness=1,
      # Disaggregated rollouts (parallel.transfer): devices of their own, taken from every
      # process alike; 0 samples on the trainer's mesh (colocated).
      rollout_devices=0,
      rollout_tensor=1,  # tensor-parallel devices per rollout replica
      rollout_dtype="",  # the replicas' param dtype ('bfloat16'); '': the trainer's
      # Continuous batching: this many cache rows serve a step's rollout rows, a finished row's
      # slot taking the next prompt (rounds of rollout_round_tokens); 0: every row at once.
      rollout_slots=0,
      rollout_round_tokens=16,
      verifier_workers=2,
      sandbox_timeout_s=3.0,
      sandbox_memory_mb=512,
      sandbox_allow_no_isolation=False,
    )
  )  # run code where namespaces are unavailable


def validate(config, n_devices: int | None = None, n_processes: int | None = None) -> None:
  """Every check `run` makes before compiling: the training config, then the `rl` section
  (unknown `rl` fields are errors); devices and processes default to this job's."""
  processes = n_processes or jax.process_count()
  n_devices = n_devices or jax.device_count()
  rl, errors = config.rl, []
  disagg = rl.get("rollout_devices", 0) > 0
  cfg = config_lib.model_config(config)
  config_lib.validate(
    config, cfg, n_devices - rl.rollout_devices if disagg else n_devices, processes
  )
  if message := unknown_fields(rl.keys(), rl_config().keys(), what="rl fields"):
    errors.append(message)
  if rl.group_size < 2:
    errors.append(f"rl.group_size={rl.group_size} must be >= 2 (advantages compare samples)")
  elif config.batch_size % rl.group_size:
    errors.append(
      f"batch_size={config.batch_size} (rollouts per update) is not divisible by "
      f"rl.group_size={rl.group_size}"
    )
  if not 1 <= rl.max_new_tokens < config.seq_len:
    errors.append(f"rl.max_new_tokens={rl.max_new_tokens} must be in [1, seq_len={config.seq_len})")
  if rl.temperature <= 0 or not 0 < rl.top_p <= 1:
    errors.append(
      "rl.temperature must be > 0 (greedy groups carry no signal) and 0 < rl.top_p <= 1"
    )
  if not (0 < rl.eps_low < 1 and rl.eps_high > 0):
    errors.append(f"need 0 < rl.eps_low < 1 and rl.eps_high > 0, got {rl.eps_low}, {rl.eps_high}")
  for name in ("updates_per_rollout", "verifier_workers"):
    if rl[name] < 1:
      errors.append(f"rl.{name}={rl[name]} must be >= 1")
  if rl.get("rollout_slots", 0) < 0 or rl.get("rollout_round_tokens", 1) < 1:
    errors.append(
      "need rl.rollout_slots >= 0 (0: every row at once) and rl.rollout_round_tokens >= 1"
    )
  elif disagg and rl.rollout_slots % max(rl.rollout_devices // max(rl.rollout_tensor, 1), 1):
    errors.append(
      f"rl.rollout_slots={rl.rollout_slots} must be a multiple of the "
      f"{rl.rollout_devices // rl.rollout_tensor} rollout replicas"
    )
  if rl.warmup_steps < 0 or rl.max_staleness < 0 or rl.loss_max_len < 0:
    errors.append("rl.warmup_steps, rl.max_staleness and rl.loss_max_len must be >= 0")
  if rl.max_turns < 1 or not 0 <= rl.episode_tokens <= config.seq_len or rl.episode_seconds <= 0:
    errors.append(
      "need rl.max_turns >= 1, 0 <= rl.episode_tokens <= seq_len and rl.episode_seconds > 0"
    )

  if disagg:
    errors += _disaggregated_errors(config, cfg, n_devices, processes)
  elif rl.group_size >= 2 and (config.batch_size // rl.group_size) % processes:
    errors.append(
      f"batch_size / rl.group_size = {config.batch_size // rl.group_size} prompts "
      f"per update do not split over {processes} processes (each samples whole "
      "groups); change batch_size"
    )
  if rl.async_rollouts and processes > 1 and not disagg:
    errors.append(
      "colocated rl.async_rollouts=True runs on one process only: a background "
      "thread's collectives would interleave with the update's across hosts; set "
      "rl.rollout_devices (rollouts on devices of their own) or rl.async_rollouts=False"
    )
  if errors:
    raise ConfigError("invalid RL config: " + "; ".join(errors))


def _disaggregated_errors(config, cfg, n_devices: int, processes: int) -> list[str]:
  """What keeps `rl.rollout_devices` from a rollout mesh: the device split, the replicas'
  param split (`rl.rollout_tensor` must divide the heads) and the schedule."""
  rl = config.rl
  errors = transfer.split_errors(
    n_devices, processes, rl.rollout_devices, rl.rollout_tensor, config.batch_size
  )
  if errors:
    return errors
  specs = transfer.rollout_specs(sharding.param_specs(cfg, sharding.normalize_rules(config.rules)))
  shapes = nnx.to_pure_dict(nnx.split(abstract_model(cfg), nnx.Param)[1])
  sizes = {
    "data": rl.rollout_devices // rl.rollout_tensor,
    "fsdp": 1,
    "tensor": rl.rollout_tensor,
    "sequence": 1,
  }
  errors += [
    f"rollout mesh: {e}; change rl.rollout_tensor"
    for e in sharding.indivisible(shapes, specs, sizes)
  ]
  if rl.updates_per_rollout != 1:
    errors.append(
      f"rl.updates_per_rollout={rl.updates_per_rollout}: disaggregated rollouts sample one "
      "batch per update (policy versions are updates); set it to 1"
    )
  if rl.rollout_dtype:
    try:
      jnp.dtype(rl.rollout_dtype)
    except TypeError:
      errors.append(f"rl.rollout_dtype={rl.rollout_dtype!r} is not a dtype (e.g. 'bfloat16')")
  return errors


def pipeline_depth(rl) -> int:
  """How many policy versions disaggregated rollouts run ahead of the update that uses
  them: `rl.max_staleness` with `rl.async_rollouts`, else 0 (sampled from the policy
  being updated)."""
  return rl.max_staleness if rl.async_rollouts else 0


TASK_SETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_sets")


def shipped_sets() -> list[str]:
  return sorted(n[:-6] for n in os.listdir(TASK_SETS) if n.endswith(".jsonl"))


def task_paths(task_files: str) -> list[str]:
  """The files of `rl.task_files`; a bare name (no '/', no '.') is a shipped set."""
  names = [p.strip() for p in task_files.split(",") if p.strip()]
  return [
    os.path.join(TASK_SETS, f"{n}.jsonl") if "/" not in n and "." not in n else n for n in names
  ]


def _matches(pattern: str) -> list[str]:
  """The files or folders a task-file pattern names (none when its bucket is missing)."""
  try:
    return storage.glob(pattern)
  except OSError:
    return []


def _sft_batch(tasks, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """Prompt + reference answer per row (batch contract), loss on the answer only."""
  batch = {
    k: np.zeros((batch_size, seq_len), np.int32)
    for k in ("inputs", "targets", "positions", "segment_ids")
  }
  batch["weights"] = np.zeros((batch_size, seq_len), np.float32)
  for i, task in enumerate(tasks):
    ids = (list(task.prompt_ids) + list(task.reference_ids))[: seq_len + 1]
    n = len(ids) - 1
    batch["inputs"][i, :n], batch["targets"][i, :n] = ids[:-1], ids[1:]
    batch["positions"][i, :n], batch["segment_ids"][i, :n] = np.arange(n), 1
    batch["weights"][i, len(task.prompt_ids) - 1 : n] = 1.0
  return batch


class _Tasks:
  """Where a step's tasks come from: a task-file stream (checkpointed with the state) or
  the embedded task list, drawn by step number (so resuming needs no state).

  `draw(step, n)` gives this process's share of `n` tasks: the next `n / processes`
  of its own stream shard, or its slice of the `n` embedded tasks every process
  draws alike (so a run gives the same batches on any number of processes).
  """

  def __init__(self, config, tasks=None, stream: datasets.TaskStream | None = None):
    self.config, self.tasks, self.stream = config, tasks, stream
    # Disaggregated rollouts: every process draws all `n` (the rollout replicas, not the
    # processes, split them); the stream is then the whole task files on every process.
    self.everywhere = config.rl.get("rollout_devices", 0) > 0

  def draw(self, step: int, n: int, salt: int = 0) -> list:
    local, index = n // jax.process_count(), jax.process_index()
    if self.everywhere:
      local, index = n, 0
    if self.stream is not None:
      return self.stream.take(local)
    rng = np.random.default_rng([self.config.seed, step, salt])
    picked = rng.choice(len(self.tasks), size=n, replace=n > len(self.tasks))
    return [self.tasks[i] for i in picked[index * local : (index + 1) * local]]


def _local_or_any(everywhere: bool):
  """The turn loop's OR over processes: none needed where one process holds every row."""
  return (lambda flags: flags) if everywhere else _any_process


def _any_process(flags: np.ndarray) -> np.ndarray:
  """Element-wise OR of boolean flags over processes."""
  if jax.process_count() == 1:
    return flags
  return (
    multihost_utils.process_allgather(flags.astype(np.int32)).reshape(-1, flags.size).any(axis=0)
  )


class _Share(NamedTuple):
  tasks: list  # what this process samples: its tasks of a kind, then filler
  real: int  # how many of them are its own (the filler's groups are dropped)


def _same_counts(single: list, multi: list, pool: list) -> tuple[_Share, _Share]:
  """Single-turn and multi-turn tasks padded to the largest count of any process with
  copies from `pool` (this process's tasks), so every process runs the same sampling
  programs (collectives) with the same shapes; one process needs no filler."""
  counts = np.array([len(single), len(multi)], np.int32)
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).reshape(-1, 2).max(axis=0)
  filler = itertools.cycle(pool)
  return tuple(
    _Share(own + [next(filler) for _ in range(int(n) - len(own))], len(own))
    for own, n in zip((single, multi), counts)
  )


def _pad_to(own: list, multiple: int, pool: list) -> _Share:
  """`own` tasks padded with copies from `pool` to a multiple of `multiple` (the filler's
  groups are dropped): rows that divide over the rollout replicas."""
  if not own:
    return _Share([], 0)
  filler = itertools.cycle(pool)
  return _Share(own + [next(filler) for _ in range(-len(own) % multiple)], len(own))


class _SharedScorer:
  """Verifies this process's share of the completions (every process holds all of them)
  and gathers the verdicts over the rollout mesh, so each is run once."""

  def __init__(self, scorer, mesh):
    self.scorer, self.mesh, self.limits = scorer, mesh, scorer.limits

  def __call__(self, tasks, completions) -> list:
    n, p = jax.process_count(), jax.process_index()
    mine = list(range(p, len(tasks), n))
    local = dict(zip(mine, self.scorer([tasks[i] for i in mine], [completions[i] for i in mine])))
    table = np.zeros((len(tasks), 2), np.float32)
    for i, r in local.items():
      table[i] = r.value, r.passed
    table = transfer.host_allgather(table, self.mesh).sum(axis=0)  # each row from one process
    return [
      local.get(i) or Reward(float(v), bool(ok), "pass" if ok else "fail")
      for i, (v, ok) in enumerate(table)
    ]

  def close(self):
    self.scorer.close()


class _SharedTools:
  """Runs this process's share of a turn's tool calls (every process holds every row) and
  gathers their outputs over the rollout mesh: each call runs once, and every process
  feeds the same tokens next turn."""

  def __init__(self, tools: episodes.ToolPool, mesh):
    self.tools, self.mesh = tools, mesh

  def __call__(self, calls) -> list[str]:
    n, p = jax.process_count(), jax.process_index()
    mine = [c if c and i % n == p else None for i, c in enumerate(calls)]
    data = [text.encode() for text in self.tools(mine)]
    lengths = transfer.host_allgather(np.array([len(b) for b in data], np.int64), self.mesh)
    lengths = lengths.sum(axis=0)  # each row's from the one process that ran it
    table = np.zeros((len(calls), max(int(lengths.max(initial=0)), 1)), np.uint8)
    for i, b in enumerate(data):
      table[i, : len(b)] = np.frombuffer(b, np.uint8)
    table = transfer.host_allgather(table, self.mesh).max(axis=0)
    return [bytes(row[:k]).decode() for row, k in zip(table, lengths)]

  def any_process(self, flags: np.ndarray) -> np.ndarray:
    """Element-wise OR of boolean flags over the processes (the turn loop's decisions)."""
    return transfer.host_allgather(flags.astype(np.int32), self.mesh).any(axis=0)


def _global_stats(groups, sampled: float) -> dict:
  """Rollout statistics over every process's groups (`rollout.group_stats`), and the
  tokens sampled in all."""
  local = rollout.group_arrays(groups)
  if jax.process_count() > 1:
    local = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in local.items()}
    sampled = float(multihost_utils.process_allgather(np.float64(sampled)).sum())
  return dict(rollout.group_stats(**local), sampled_tokens=sampled)


class _Sampler:
  """Rollout batch of one step: pick prompts, sample groups with given params, score."""

  def __init__(
    self,
    config,
    graphdef,
    tokenizer,
    tasks: _Tasks,
    scorer,
    rows: NamedSharding,
    rules=(),
    everywhere: bool = False,
  ):
    self.config, self.graphdef, self.tokenizer, self.tasks, self.scorer = (
      config,
      graphdef,
      tokenizer,
      tasks,
      scorer,
    )
    self.rows = rows  # rollout rows over the training mesh's data axes
    self.rules = rules  # the logical axis rules: the KV cache is split as the plan splits it
    # Disaggregated: every process samples all rows on the rollout mesh (`rows.mesh`),
    # verifies its share of them and gathers the verdicts over that mesh.
    self.everywhere = everywhere
    if everywhere and jax.process_count() > 1:
      self.scorer = _SharedScorer(scorer, rows.mesh)
    # Prompts are padded to one length (one compile): the longest prompt that fits.
    self.pad = config.seq_len - config.rl.max_new_tokens

  def __call__(self, params, version: int, step: int | None = None):
    """The rollout batch of update `step` (default `version`) sampled with the params of
    policy `version`: tasks and sampling seed follow the update, groups carry the version."""
    step = version if step is None else step
    with nnx.logical_axis_rules(self.rules):
      if not self.everywhere:
        return self._sample(params, version, step)
      with jax.set_mesh(self.rows.mesh):  # activations constrained on the rollout mesh
        return self._sample(params, version, step)

  def _sample(self, params, version: int, step: int):
    rl, t0 = self.config.rl, time.perf_counter()
    model = nnx.merge(self.graphdef, params)
    seed = self.config.seed * 1_000_003 + step
    tasks = self.tasks.draw(step, self.config.batch_size // rl.group_size)
    single_own, multi_own = [t for t in tasks if not t.tools], [t for t in tasks if t.tools]
    if self.everywhere:
      single, multi = (
        _pad_to(own, self._replica_multiple(), tasks) for own in (single_own, multi_own)
      )
    else:
      single, multi = _same_counts(single_own, multi_own, tasks)
    groups = (
      rollout.collect(
        model,
        single.tasks,
        group_size=rl.group_size,
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        stop_ids=self.tokenizer.stop_ids,
        decode=self.tokenizer.decode,
        scorer=self.scorer,
        seed=seed,
        version=version,
        pad_multiple=self.pad,
        row_sharding=self._rows(rl.rollout_slots or len(single.tasks) * rl.group_size),
        global_rows=self.everywhere,
        **self._slots(),
      )[: single.real]
      if single.tasks
      else []
    )
    if multi.tasks:
      limits = episodes.EpisodeLimits(
        max_turns=rl.max_turns,
        max_tokens=rl.episode_tokens or self.config.seq_len,
        max_seconds=rl.episode_seconds,
        message_tokens=rl.max_new_tokens,
      )

      def make_turns(rows: int) -> Turns:
        return Turns(
          model,
          rows,
          limits.max_tokens,
          temperature=rl.temperature,
          top_p=rl.top_p,
          stop_ids=self.tokenizer.stop_ids,
          seed=seed,
          pad_multiple=self.pad,
          row_sharding=self._rows(rows),
          global_rows=self.everywhere,
        )

      tools = episodes.ToolPool(self.scorer.limits, rl.verifier_workers)
      shared = None
      if self.everywhere and jax.process_count() > 1:
        shared = _SharedTools(tools, self.rows.mesh)
      try:
        groups += episodes.collect_groups(
          make_turns,
          multi.tasks,
          self.tokenizer,
          group_size=rl.group_size,
          scorer=self.scorer,
          version=version,
          limits=limits,
          any_process=(shared.any_process if shared else _local_or_any(self.everywhere)),
          run_tools=shared or tools,
        )[: multi.real]
      finally:
        tools.close()
    batch, _ = rollout.make_batch(groups, self.config.seq_len)
    sampled = float(sum(sum(e.policy) for g in groups for e in g.episodes))
    if self.everywhere:  # every process holds every group
      stats = dict(rollout.group_stats(**rollout.group_arrays(groups)), sampled_tokens=sampled)
    else:
      stats = _global_stats(groups, sampled)
    dt = time.perf_counter() - t0
    return batch, dict(
      stats, rollout_time=dt, rollout_tokens_per_sec=stats.pop("sampled_tokens") / max(dt, 1e-9)
    )

  def _slots(self) -> dict:
    """Continuous batching (`rl.rollout_slots` cache rows serve a step's rollouts)."""
    rl = self.config.rl
    if not rl.rollout_slots:
      return {}
    return {
      "generate_fn": functools.partial(
        generate_slots, slots=rl.rollout_slots, round_tokens=rl.rollout_round_tokens
      )
    }

  def _replica_multiple(self) -> int:
    """Tasks per sampling call must be a multiple of this for their rows to divide over
    the rollout replicas."""
    size = rows_lib.row_blocks(self.rows)
    return size // math.gcd(size, self.config.rl.group_size)

  def _rows(self, n: int) -> NamedSharding | None:
    """The row sharding when this process's `n` rows (as many on every process) divide
    evenly over it; else None (one process only: sampled unsharded)."""
    size = rows_lib.row_blocks(self.rows)
    if (n * (1 if self.everywhere else jax.process_count())) % size == 0:
      return self.rows
    if jax.process_count() > 1:
      raise ConfigError(
        f"{n} rollout rows per process do not divide over the {size} "
        "devices of the batch axes; change batch_size or rl.group_size"
      )
    return None


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


class _Rollouts:
  """Disaggregated rollouts: the rollout replicas sample on devices of their own from
  weights synced device to device (`transfer.WeightSync`), while the trainer's devices
  run the update.

  Deterministic on every process (all of them issue the same programs in the same
  order, so nothing needs a thread): update `u`'s batch is sampled from policy version
  `u - depth` (`pipeline_depth`). `before(params, u)` syncs version `u` to the replicas
  (before the update donates those params) and, when no batch for `u` is ready (depth 0,
  the first updates of a launch), samples it now; `after(u)`, called once update `u` is
  dispatched, samples the batch of update `u + depth` on the replicas while the update
  runs. A batch is therefore never more than `depth` <= `rl.max_staleness` versions old;
  a resumed launch samples afresh from the restored params.
  """

  def __init__(self, sampler: _Sampler, sync: transfer.WeightSync, depth: int, total: int):
    self.sampler, self.sync, self.depth, self.total = sampler, sync, depth, total
    self.ready: dict[int, tuple[int, tuple]] = {}  # update -> (policy version, batch)
    self.policy = None

  def before(self, params, step: int) -> None:
    self.policy = (self.sync(params, step), step)
    if step not in self.ready:
      self.ready[step] = self._sample(step)

  def after(self, step: int) -> None:
    ahead = step + self.depth
    if self.depth and ahead < self.total and ahead not in self.ready:
      self.ready[ahead] = self._sample(ahead)

  def get(self, step: int):
    version, out = self.ready.pop(step)
    return out, step - version

  def _sample(self, step: int):
    params, version = self.policy
    return version, self.sampler(params, version, step)


class _UpdateClock:
  """Update times measured off the loop: a watcher thread waits for an update's outputs
  (waiting issues no collective, so it is safe beside the loop on every process) and notes
  the seconds from its dispatch; `last()` gives the previous update's (0.0 before any)."""

  def __init__(self):
    self._thread, self._seconds = None, 0.0

  def start(self, outputs, t0: float) -> None:
    self.last()

    def wait():
      jax.block_until_ready(outputs)
      self._seconds = time.perf_counter() - t0

    self._thread = threading.Thread(target=wait, daemon=True, name="rl-update-clock")
    self._thread.start()

  def last(self) -> float:
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    return self._seconds


class RLTrainer:
  """Supervised warmup steps, then rollout batches and their GRPO steps.

  `data_iter` is the task-file stream (its position and bad-task counts are saved with
  each checkpoint), or None for the embedded tasks, which are drawn by step number.
  """

  def __init__(
    self,
    rt: runtime.Runtime,
    tokenizer,
    tasks: _Tasks,
    rollout_layout: transfer.Layout | None = None,
  ):
    self.rt, config = rt, rt.config
    self.config, self.tasks = config, tasks
    self.data_iter = tasks.stream
    rl = config.rl
    self.rl_step = rt.cached(
      "rl_step",
      lambda: grpo.jit_rl_step(
        grpo.make_rl_step(
          rt.cfg,
          rt.tx,
          rt.schedule,
          rules=rt.rules,
          max_len=rl.loss_max_len or rl.max_new_tokens,
          eps_low=rl.eps_low,
          eps_high=rl.eps_high,
          execution=rt.execution,
          grad_accum=config.grad_accum,
        ),
        rt.shardings,
        rt.batch_sharding,
        rt.compiler_options,
      ),
    )
    self.sft_step = rt.cached(
      "sft_step",
      lambda: step_lib.jit_train_step(
        step_lib.make_train_step(
          rt.cfg, rt.tx, rt.schedule, rules=rt.rules, execution=rt.execution
        ),
        rt.shardings,
        rt.batch_sharding,
        rt.compiler_options,
      ),
    )
    graphdef = nnx.split(abstract_model(rt.cfg, rt.execution), nnx.Param)[0]
    self.scorer = rollout.Scorer(rl.verifier_workers, _limits(rl))
    self.rollouts, self.feed = None, None
    if rollout_layout is not None:  # rollouts on a mesh of their own
      rows = rows_lib.row_sharding(NamedSharding(rollout_layout.mesh, rt.batch_sharding.spec))
      sampler = _Sampler(
        config, graphdef, tokenizer, tasks, self.scorer, rows, rt.rules, everywhere=True
      )
      specs = jax.tree.map(
        lambda s: s.spec, rt.shardings["params"], is_leaf=lambda x: isinstance(x, NamedSharding)
      )
      sync = transfer.WeightSync(rollout_layout, specs, rl.rollout_dtype or None)
      self.rollouts = _Rollouts(sampler, sync, pipeline_depth(rl), config.total_steps)
    else:
      rows = rows_lib.row_sharding(rt.batch_sharding)
      self.feed = _Feed(
        config, _Sampler(config, graphdef, tokenizer, tasks, self.scorer, rows, rt.rules)
      )
    self.published = None
    self.clock = _UpdateClock()

  def iterate(self, state: dict, step: int):
    if self.feed is not None and self.published is None:
      self.feed.publish(state["params"], step)
      self.published = step
    if step < self.config.rl.warmup_steps:
      yield self._warmup(state, step)
    else:
      yield from self._rl_steps(state, step)

  def _warmup(self, state, step: int) -> runtime.Update:
    config = self.config
    tasks = self.tasks.draw(step, config.batch_size, salt=1)
    state, metrics = self.sft_step(state, self._put(_sft_batch(tasks, len(tasks), config.seq_len)))
    if self.feed is not None:
      self.feed.publish(state["params"], step + 1)
    return runtime.Update(state, step + 1, dict(metrics, warmup=1.0))

  def _rl_steps(self, state, step: int):
    """One rollout batch and its optimizer steps."""
    rt, config = self.rt, self.config
    if self.rollouts is not None:
      self.rollouts.before(state["params"], step)
      (batch, stats), staleness = self.rollouts.get(step)
      stats = dict(stats, stale_dropped=0, staleness=staleness)
    else:
      (batch, stats), staleness = self.feed.get(state["params"], step)
      stats = dict(stats, stale_dropped=self.feed.dropped, staleness=staleness)
    if stats["groups_kept"] == 0:  # no group carries signal: no update
      state = dict(state, step=state["step"] + 1)
      if self.rollouts is not None:
        self.rollouts.after(step)
      else:
        self.feed.publish(state["params"], step + 1)  # same params, next policy version
      yield runtime.Update(
        state,
        step + 1,
        dict(
          stats,
          loss=0.0,
          grad_norm=0.0,
          clip_fraction=0.0,
          skipped=1.0,
          lr=float(rt.schedule(step)),
        ),
      )
      return
    device_batch = self._put(batch)
    for _ in range(min(config.rl.updates_per_rollout, config.total_steps - step)):
      t0, previous = time.perf_counter(), self.clock.last()
      state, metrics = self.rl_step(state, device_batch)
      self.clock.start(metrics, t0)
      if self.rollouts is not None:  # the update runs on the trainer's devices meanwhile
        self.rollouts.after(step)
      step += 1
      if self.feed is not None:
        self.feed.publish(state["params"], step)
      yield runtime.Update(state, step, dict(stats, **metrics, skipped=0.0, update_time=previous))

  def _put(self, local: dict[str, np.ndarray]) -> dict:
    """This process's rows of a global batch as sharded arrays ([B, T] over the batch
    axes, [B] over their first)."""
    # Disaggregated, every process holds every row: its arrays are the global batch.
    rows = len(next(iter(local.values()))) if self.rollouts is not None else self.config.batch_size
    return rows_lib.global_batch(local, self.rt.batch_sharding, rows)

  def close(self) -> None:
    if self.feed is not None:
      self.feed.close()
    self.scorer.close()


def _limits(rl) -> Limits:
  return Limits(
    timeout_s=rl.sandbox_timeout_s,
    memory_mb=rl.sandbox_memory_mb,
    output_bytes=100_000,
    allow_no_isolation=rl.sandbox_allow_no_isolation,
  )


def task_source(config) -> tuple[object, _Tasks]:
  """(tokenizer, task source) of an RL config: its task files, else its embedded kinds."""
  rl, max_prompt = config.rl, config.seq_len - config.rl.max_new_tokens
  if rl.task_files:
    missing = [p for p in task_paths(rl.task_files) if not _matches(p)]
    if missing:
      raise ConfigError(
        f"rl.task_files: nothing at {missing}; give JSONL task files, folders or "
        f"globs, or a shipped set name ({', '.join(shipped_sets())})"
      )
    tokenizer = Tokenizer.default()
    # Disaggregated, every process draws every task (`_Tasks`): one stream, read whole.
    everywhere = rl.get("rollout_devices", 0) > 0
    stream = datasets.TaskStream(
      task_paths(rl.task_files),
      tokenizer,
      max_prompt_len=max_prompt,
      seed=config.seed,
      process_index=0 if everywhere else jax.process_index(),
      process_count=1 if everywhere else jax.process_count(),
      limits=_limits(rl),
    )
    return tokenizer, _Tasks(config, stream=stream)
  tokenizer, tasks = tasks_lib.task_set(
    rl.tasks, max_prompt_len=max_prompt, seed=config.seed, limits=_limits(rl)
  )
  return tokenizer, _Tasks(config, tasks=tasks)


def run(config, workdir: str, hooks=()) -> dict:
  """Runs RL until step `config.total_steps`; returns {'step', 'records', 'preempted'}."""
  validate(config)
  cfg = config_lib.model_config(config)
  if config.rl.task_files or {"code", "trace"} & {k.strip() for k in config.rl.tasks.split(",")}:
    limits = _limits(config.rl)  # verifiers run code: refuse now, not at the first reward
    isolation.check(limits.namespaces, limits.allow_no_isolation)
  tokenizer, tasks = task_source(config)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(
      f"the RL tasks need vocab_size >= {tokenizer.vocab_size}, the "
      f"model has {cfg.vocab_size}; set model.overrides.vocab_size"
    )
  layout = None
  if config.rl.rollout_devices:
    trainer_devices, rollout_devices = transfer.split_devices(config.rl.rollout_devices)
    layout = transfer.layout(trainer_devices, rollout_devices, config.rl.rollout_tensor)
    rt = runtime.setup(config, trainer_devices)
  else:
    rt = runtime.setup(config)
  return runtime.run(rt, workdir, RLTrainer(rt, tokenizer, tasks, layout), hooks)
