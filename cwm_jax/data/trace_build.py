"""Trace-corpus stages shared by every runner, and the ArrayRecord shard writer.

A work item (a call, `sources_functions.FunctionItem`, or a test module,
`repo_traces.TestModuleItem`) is traced by `run_item` into candidates; `TraceFilter` drops, in
build order, failed calls by status, oversized traces (`too_long`), exact duplicates and
contaminated sources, counting why; `trace_manifest` turns the counts into the manifest fields.
`build_locally` runs them with a thread pool whose threads each drive sandboxed processes
(`workers` items at a time); `beam_build` runs the same stages as an Apache Beam pipeline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import time

from array_record.python import array_record_module

from cwm_jax import storage
from cwm_jax.data import dedup, repo_traces, traces
from cwm_jax.data import sources_functions as functions

DROP_REASONS = (
  "timeout",
  "memory",
  "output_limit",
  "too_long",
  "error",
  "duplicate",
  "contaminated",
)


@dataclasses.dataclass(frozen=True)
class TraceBuildConfig:
  """How a trace corpus is built: parallelism, limits, evaluation set, runner."""

  workers: int = 2
  trace_limits: traces.Limits = traces.Limits()
  repo_limits: repo_traces.RepoLimits = repo_traces.RepoLimits()
  eval_paths: tuple[str, ...] = ()  # user evaluation set, besides the held-out programs
  ngram: int = 13
  contamination_threshold: float = 0.1
  runner: str = "local"  # or a Beam runner name (DirectRunner, DataflowRunner, ...)
  pipeline_args: tuple[str, ...] = ()  # Beam PipelineOptions flags
  progress: bool = True  # progress lines on stderr


def write_array_record(
  records, out: str, prefix: str, num_shards: int = 1, extra: dict | None = None
) -> dict:
  """Writes records round-robin into `num_shards` ArrayRecord files plus manifest.json.

  `out` is a local folder: the ArrayRecord writer writes local files only (`corpus_build`
  stages a URL's corpus locally and publishes it)."""
  if storage.is_url(out):
    raise ValueError(
      f"write_array_record writes local files, not {out!r}: stage the corpus "
      "with storage.publish_dir (as corpus_build does)"
    )
  os.makedirs(out, exist_ok=True)
  paths = [
    os.path.join(out, f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record")
    for i in range(num_shards)
  ]
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
  count = 0
  try:
    for record in records:
      data = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
      writers[count % num_shards].write(data)
      count += 1
  finally:
    for w in writers:
      w.close()
  manifest = {
    "corpus": prefix,
    "writer": "array_record",
    "records": count,
    "shards": [os.path.basename(p) for p in paths],
    "schema": "one JSON object per record, see cwm_jax.data.formats",
    **(extra or {}),
  }
  storage.write_json(os.path.join(out, "manifest.json"), manifest, indent=1)
  return manifest


def run_item(item, cfg: TraceBuildConfig) -> tuple[list, collections.Counter]:
  """Traces one work item: (candidates, counters)."""
  if isinstance(item, functions.FunctionItem):
    return functions.trace_function(item, cfg.trace_limits), collections.Counter()
  return repo_traces.trace_test_module(item, cfg.repo_limits, cfg.trace_limits)


def trace_locally(items: list, cfg: TraceBuildConfig):
  """Yields (candidates, counters) per item, in item order, tracing `workers` items at once."""
  start, done, found = time.monotonic(), 0, 0
  with concurrent.futures.ThreadPoolExecutor(cfg.workers) as pool:
    for candidates, counts in pool.map(lambda it: run_item(it, cfg), items):
      done, found = done + 1, found + len(candidates)
      if cfg.progress and (done == len(items) or done % max(1, len(items) // 20) == 0):
        print(
          f"traced {done}/{len(items)} items, {found} calls, {time.monotonic() - start:.1f} s",
          file=sys.stderr,
          flush=True,
        )
      yield candidates, counts


def eval_programs(cfg: TraceBuildConfig) -> dict[str, str]:
  """The held-out programs plus the user's evaluation set."""
  return {**dedup.held_out_programs(), **dedup.read_eval_set(cfg.eval_paths)}


class TraceFilter:
  """Drops failed, oversized, duplicate and contaminated candidates; counts why."""

  def __init__(self, cfg: TraceBuildConfig):
    eval_docs = eval_programs(cfg)
    self.decontaminator = dedup.Decontaminator(
      eval_docs, n=cfg.ngram, threshold=cfg.contamination_threshold
    )
    self.eval_programs = len(eval_docs)
    self.max_trace_bytes = cfg.trace_limits.max_trace_bytes
    self.seen, self.dropped = set(), collections.Counter()
    self.contaminated_by, self.candidates = collections.Counter(), 0

  def __call__(self, candidate) -> dict | None:
    self.candidates += 1
    status, record, key = functions.finalize(candidate, self.max_trace_bytes)
    if status != "ok":
      self.dropped[status] += 1
      return None
    if key in self.seen:
      self.dropped["duplicate"] += 1
      return None
    self.seen.add(key)
    match = self.decontaminator.match(candidate.source)
    if match:
      self.dropped["contaminated"] += 1
      self.contaminated_by[match] += 1
      return None
    return record


def trace_manifest(
  dropped: collections.Counter,
  contaminated_by: collections.Counter,
  candidates: int,
  eval_programs: int,
  counts: collections.Counter,
  cfg: TraceBuildConfig,
  items: int,
  seconds: float,
) -> dict:
  """The statistics of a trace build (merged into manifest.json)."""
  dropped = {r: dropped.get(r, 0) for r in DROP_REASONS} | {
    r: n for r, n in dropped.items() if r not in DROP_REASONS
  }
  traced = candidates
  return {
    "runner": cfg.runner,
    "workers": cfg.workers,
    "items": items,
    "candidates": traced,
    "kept": traced - sum(dropped.values()),
    "dropped": dropped,
    "not_traced": {k: counts.get(k, 0) for k in ("unsupported", "capped")},
    "tests": {k[len("tests_") :]: n for k, n in sorted(counts.items()) if k.startswith("tests_")},
    "sessions_failed": {
      k[len("session_") :]: n for k, n in sorted(counts.items()) if k.startswith("session_")
    },
    "dedup": {
      "duplicates": dropped["duplicate"],
      "key": "sha256(normalised source, function, inputs, sha256(trace))",
    },
    "decontamination": {
      "eval_programs": eval_programs,
      "ngram": cfg.ngram,
      "threshold": cfg.contamination_threshold,
      "contaminated": dropped["contaminated"],
      "by_program": dict(sorted(contaminated_by.items())),
    },
    "seconds": round(seconds, 2),
    "traces_per_s": round(traced / max(seconds, 1e-9), 2),
    "traces_per_s_per_worker": round(traced / max(seconds, 1e-9) / cfg.workers, 2),
  }


def build_locally(
  name: str, items: list, out: str, cfg: TraceBuildConfig, num_shards: int = 1
) -> dict:
  """Traces `items` with a local thread pool, filters them and writes corpus `name` under
  local folder `out`; returns the manifest."""
  start = time.monotonic()
  flt, counts = TraceFilter(cfg), collections.Counter()

  def records():
    for candidates, item_counts in trace_locally(items, cfg):
      counts.update(item_counts)
      yield from filter(None, map(flt, candidates))

  manifest = write_array_record(records(), out, name, num_shards)
  manifest.update(
    trace_manifest(
      flt.dropped,
      flt.contaminated_by,
      flt.candidates,
      flt.eval_programs,
      counts,
      cfg,
      len(items),
      time.monotonic() - start,
    )
  )
  storage.write_json(os.path.join(out, "manifest.json"), manifest, indent=1)
  return manifest
