"""Rollouts: G samples per prompt from the current policy, scored, packed into a batch.

`collect` samples every prompt `group_size` times with the KV-cache sampler,
which returns the sampling policy's log-probabilities (the GRPO "old policy"
log-probs, recorded at rollout time, never recomputed), and scores each
completion with the task's verifier. `make_batch` turns groups into the RL
batch: one episode per row, loss mask on policy tokens only, the group
advantage on every row. `AsyncRollouts` samples in a background thread from
a snapshot of the params and drops batches more than `max_staleness` policy
versions old.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable, Sequence

import numpy as np

from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer.rewards import DEFAULT_LIMITS, Reward
from cwm_jax.infer.sampler import generate
from cwm_jax.rl import grpo
from cwm_jax.rl.tasks import KINDS, Task


@dataclasses.dataclass
class Episode:
  """Token ids of a whole episode; `policy[t]` marks tokens the policy sampled (the only
  ones in the loss) and `old_logp[t]` their log-probability at sampling time."""

  tokens: list[int]
  policy: list[bool]
  old_logp: list[float]


def episode(turns: Sequence[tuple[Sequence[int], Sequence[float] | None]]) -> Episode:
  """An episode from turns (ids, logprobs): logprobs None marks prompt/environment tokens."""
  out = Episode([], [], [])
  for ids, logps in turns:
    if logps is not None and len(logps) != len(ids):
      raise ValueError(f"a policy turn has {len(ids)} tokens but {len(logps)} log-probs")
    out.tokens += [int(i) for i in ids]
    out.policy += [logps is not None] * len(ids)
    out.old_logp += [float(x) for x in logps] if logps is not None else [0.0] * len(ids)
  return out


@dataclasses.dataclass
class Group:
  task: Task
  episodes: list[Episode]
  completions: list[str]
  rewards: list[Reward]
  response_lengths: list[int]
  version: int  # policy version (optimizer step) that sampled the group


class Scorer:
  """Runs verifiers in a thread pool (sandbox runs are subprocesses) and caches verdicts
  per (task, completion): identical samples are verified once."""

  def __init__(self, workers: int = 2, limits: Limits = DEFAULT_LIMITS):
    self.limits = limits  # the sandbox limits of the tasks' programs and tools
    self._pool = concurrent.futures.ThreadPoolExecutor(max(workers, 1))
    self._cache: dict[tuple[str, str], Reward] = {}

  def __call__(self, tasks: Sequence[Task], completions: Sequence[str]) -> list[Reward]:
    keys = [(t.name, c) for t, c in zip(tasks, completions)]
    todo = {k: t for k, t in zip(keys, tasks) if k not in self._cache}
    futures = {k: self._pool.submit(t.verify, k[1]) for k, t in todo.items()}
    for k, f in futures.items():
      self._cache[k] = f.result()
    return [self._cache[k] for k in keys]

  def close(self):
    self._pool.shutdown(wait=True)


def completion_text(decode: Callable, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
  """The decoded completion without its final stop token, except `<|end_of_text|>`, which
  ends a trace and is part of what a trace verifier reads."""
  ids = list(ids)
  if ids and ids[-1] in stop_ids and decode(ids[-1:]) != trace_format.END:
    ids = ids[:-1]
  return decode(ids)


def collect(
  model,
  tasks: Sequence[Task],
  *,
  group_size: int,
  max_new_tokens: int,
  temperature: float,
  top_p: float,
  stop_ids: Sequence[int],
  decode: Callable,
  scorer: Callable,
  seed: int,
  version: int,
  pad_multiple: int = 32,
  row_sharding=None,
  global_rows: bool = False,
  generate_fn: Callable = generate,
) -> list[Group]:
  """`group_size` sampled completions of each task, scored; one Group per task.
  `row_sharding` spreads the rows over the mesh, `global_rows` says every process passes
  all of them (see `sampler.generate`)."""
  prompts = [list(t.prompt_ids) for t in tasks for _ in range(group_size)]
  sharded = {} if row_sharding is None else {"row_sharding": row_sharding}
  if global_rows:
    sharded["global_rows"] = True
  result = generate_fn(
    model,
    prompts,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    stop_ids=tuple(stop_ids),
    seed=seed,
    pad_multiple=pad_multiple,
    **sharded,
  )
  texts = [completion_text(decode, ids, stop_ids) for ids in result.tokens]
  rewards = scorer([t for t in tasks for _ in range(group_size)], texts)
  groups = []
  for i, task in enumerate(tasks):
    rows = range(i * group_size, (i + 1) * group_size)
    groups.append(
      Group(
        task,
        [episode([(task.prompt_ids, None), (result.tokens[r], result.logprobs[r])]) for r in rows],
        [texts[r] for r in rows],
        [rewards[r] for r in rows],
        [len(result.tokens[r]) for r in rows],
        version,
      )
    )
  return groups


def make_batch(groups: Sequence[Group], seq_len: int) -> tuple[dict[str, np.ndarray], dict]:
  """The RL batch ([B, T] arrays as the train batch contract, plus `loss_mask`, `old_logp`
  and [B] `advantages`) and rollout statistics. Rows of skipped groups keep their tokens but
  get an all-zero loss mask, so batch shapes never change."""
  rewards_NG = np.array([[r.value for r in g.rewards] for g in groups], np.float32)
  adv_NG = grpo.group_advantages(rewards_NG)
  kept_N = grpo.groups_kept(adv_NG)
  episodes = [e for g in groups for e in g.episodes]
  b = len(episodes)
  batch = {
    k: np.zeros((b, seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")
  }
  batch["loss_mask"] = np.zeros((b, seq_len), np.float32)
  batch["old_logp"] = np.zeros((b, seq_len), np.float32)
  batch["advantages"] = adv_NG.reshape(-1)
  kept_B = np.repeat(kept_N, adv_NG.shape[1])
  for i, ep in enumerate(episodes):
    n = len(ep.tokens) - 1
    if n > seq_len:
      raise ValueError(
        f"an episode of {n + 1} tokens does not fit seq_len={seq_len} (+1); "
        "raise seq_len or lower rl.max_new_tokens"
      )
    batch["inputs"][i, :n] = ep.tokens[:-1]
    batch["targets"][i, :n] = ep.tokens[1:]
    batch["positions"][i, :n] = np.arange(n)
    batch["segment_ids"][i, :n] = 1
    batch["loss_mask"][i, :n] = np.asarray(ep.policy[1:], np.float32) * kept_B[i]
    batch["old_logp"][i, :n] = ep.old_logp[1:]
  return batch, group_stats(**group_arrays(groups))


STAT_KINDS = KINDS + ("agentic",)  # task kinds, coded by index in `group_arrays`


def group_arrays(groups: Sequence[Group]) -> dict[str, np.ndarray]:
  """What rollout statistics need of each group, as arrays (gathered over processes as is):
  rewards, passed and response lengths [N, G], kind codes [N]."""
  return {
    "rewards": np.array([[r.value for r in g.rewards] for g in groups], np.float32),
    "passed": np.array([[r.passed for r in g.rewards] for g in groups], np.float32),
    "lengths": np.array([g.response_lengths for g in groups], np.float32),
    "kinds": np.array([STAT_KINDS.index(g.task.kind) for g in groups], np.int32),
  }


def group_stats(rewards, passed, lengths, kinds) -> dict[str, float]:
  """reward_mean, pass_rate, response_length, groups_kept and reward_<kind>."""
  stats = {
    "reward_mean": float(rewards.mean()),
    "pass_rate": float(passed.mean()),
    "response_length": float(lengths.mean()),
    "groups_kept": float(grpo.groups_kept(grpo.group_advantages(rewards)).mean()),
  }
  for code in sorted(set(kinds.tolist())):
    stats[f"reward_{STAT_KINDS[code]}"] = float(rewards[kinds == code].mean())
  return stats


class AsyncRollouts:
  """Samples rollout batches in a background thread while the policy trains.

  `produce(params, version) -> (batch, stats)` runs on the latest published params.
  `get(version)` returns the next batch sampled at most `max_staleness` versions before
  `version`, dropping (and counting) older ones.
  """

  def __init__(self, produce: Callable, max_staleness: int, queue_size: int = 1):
    self._produce, self.max_staleness = produce, max_staleness
    self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
    self._latest: tuple | None = None
    self._cond = threading.Condition()
    self._stop = threading.Event()
    self.dropped, self._error = 0, None
    self._thread = threading.Thread(target=self._run, daemon=True, name="rl-rollouts")
    self._thread.start()

  def publish(self, params, version: int) -> None:
    """Makes `params` (a copy the caller will not donate or mutate) the sampling policy."""
    with self._cond:
      self._latest = (params, version)
      self._cond.notify_all()

  def _run(self):
    try:
      while not self._stop.is_set():
        with self._cond:
          self._cond.wait_for(lambda: self._latest is not None or self._stop.is_set())
          latest = self._latest
        if self._stop.is_set():
          return
        item = (latest[1], self._produce(*latest))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by get())
      self._error = e

  def get(self, version: int):
    """(sampled_at, item) of the next batch fresh enough for policy `version`."""
    while True:
      try:
        sampled_at, item = self._queue.get(timeout=0.1)
      except queue.Empty:
        if self._error is not None:
          raise RuntimeError("the rollout thread failed") from self._error
        continue
      if version - sampled_at <= self.max_staleness:
        return sampled_at, item
      self.dropped += 1

  def close(self):
    self._stop.set()
    with self._cond:
      self._cond.notify_all()
    self._thread.join(timeout=60)
