"""Corpus builds: every corpus written as ArrayRecord shards plus `manifest.json`.

Embedded corpora (`code`, `traces`, `sft`, see `corpora`) are written as their records come.
Trace corpora are built from work items in parallel, then filtered in build order:
  functions    calls of the shipped programs (held-out ones skipped), of a functions JSONL and
               of the literal doctest calls of pure-Python modules (`sources_functions`);
  repo_traces  the test modules of a repository (or of the CPython standard library's own test
               suite), each run under pytest with the tracer (`repo_traces`).
Stages: trace (`workers` at a time: locally a thread pool whose threads each drive one sandboxed
process, or an Apache Beam pipeline, see `beam_build`) -> drop failed calls by status -> format
(`too_long` over `max_trace_bytes`) -> exact dedup -> n-gram decontamination -> shards. The
manifest counts candidates, kept records and drops by reason, tests by outcome and calls not
traced ('unsupported' generators/nested functions, 'capped' by the per-test limit).

Training configs may name a corpus instead of a path: a mixture entry `{kind: 'corpus', name,
limit, weight}` is built once by `resolve_corpora` into DATA_DIR/NAME and replaced by
`{kind: 'array_record', path: DATA_DIR/NAME}`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import time

from absl import logging
from array_record.python import array_record_module

from cwm_jax.data import corpora
from cwm_jax.data import dedup
from cwm_jax.data import repo_traces
from cwm_jax.data import sources_functions as functions
from cwm_jax.data import traces
from cwm_jax.base import ConfigError

TRACE_CORPORA = ('functions', 'repo_traces')
CORPORA = corpora.CORPORA + TRACE_CORPORA
WRITERS = ('array_record', 'tfds')
DROP_REASONS = ('timeout', 'memory', 'output_limit', 'too_long', 'error', 'duplicate',
                'contaminated')


@dataclasses.dataclass(frozen=True)
class TraceBuildConfig:
  """How a trace corpus is built: parallelism, limits, evaluation set, runner."""
  workers: int = 2
  trace_limits: traces.Limits = traces.Limits()
  repo_limits: repo_traces.RepoLimits = repo_traces.RepoLimits()
  eval_paths: tuple[str, ...] = ()  # user evaluation set, besides the held-out programs
  ngram: int = 13
  contamination_threshold: float = 0.1
  runner: str = 'local'  # or a Beam runner name (DirectRunner, DataflowRunner, ...)
  pipeline_args: tuple[str, ...] = ()  # Beam PipelineOptions flags
  progress: bool = True  # progress lines on stderr


def write_array_record(records, out: str, prefix: str, num_shards: int = 1,
                       extra: dict | None = None) -> dict:
  """Writes records round-robin into `num_shards` ArrayRecord files plus manifest.json."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f'{prefix}-{i:05d}-of-{num_shards:05d}'
                        '.array_record') for i in range(num_shards)]
  writers = [array_record_module.ArrayRecordWriter(p, 'group_size:1')
             for p in paths]
  count = 0
  try:
    for record in records:
      data = json.dumps(record, ensure_ascii=False).encode('utf-8', 'surrogatepass')
      writers[count % num_shards].write(data)
      count += 1
  finally:
    for w in writers:
      w.close()
  manifest = {'corpus': prefix, 'writer': 'array_record', 'records': count,
              'shards': [os.path.basename(p) for p in paths],
              'schema': 'one JSON object per record, see cwm_jax.data.formats', **(extra or {})}
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def trace_items(name: str, *, limit: int | None = None, functions_jsonl: str | None = None,
                doctest_modules=traces.DOCTEST_MODULES, programs: bool = True,
                repo: str | None = None,
                stdlib_tests=repo_traces.STDLIB_EXAMPLE, repo_exclude=()) -> list:
  """The work items of trace corpus `name`; `limit` caps calls (functions) or test modules."""
  if name == 'functions':
    calls = [c for c in traces.program_calls()
             if programs and not traces.examples.is_held_out(c.origin)]
    if functions_jsonl:
      calls += functions.read_function_specs(functions_jsonl)
    items = [functions.FunctionItem(c) for c in calls]
    items += functions.doctest_items(doctest_modules or ())
  elif name == 'repo_traces':
    items = (repo_traces.repo_test_items(repo, repo_exclude) if repo
             else repo_traces.stdlib_test_items(stdlib_tests))
  else:
    raise ConfigError(f'{name!r} is not a trace corpus; choose one of {TRACE_CORPORA}')
  return items[:limit]


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
        print(f'traced {done}/{len(items)} items, {found} calls, '
              f'{time.monotonic() - start:.1f} s', file=sys.stderr, flush=True)
      yield candidates, counts


def eval_programs(cfg: TraceBuildConfig) -> dict[str, str]:
  """The held-out programs plus the user's evaluation set."""
  return {**dedup.held_out_programs(), **dedup.read_eval_set(cfg.eval_paths)}


class TraceFilter:
  """Drops failed, oversized, duplicate and contaminated candidates; counts why."""

  def __init__(self, cfg: TraceBuildConfig):
    eval_docs = eval_programs(cfg)
    self.decontaminator = dedup.Decontaminator(eval_docs, n=cfg.ngram,
                                               threshold=cfg.contamination_threshold)
    self.eval_programs = len(eval_docs)
    self.max_trace_bytes = cfg.trace_limits.max_trace_bytes
    self.seen, self.dropped = set(), collections.Counter()
    self.contaminated_by, self.candidates = collections.Counter(), 0

  def __call__(self, candidate) -> dict | None:
    self.candidates += 1
    status, record, key = functions.finalize(candidate, self.max_trace_bytes)
    if status != 'ok':
      self.dropped[status] += 1
      return None
    if key in self.seen:
      self.dropped['duplicate'] += 1
      return None
    self.seen.add(key)
    match = self.decontaminator.match(candidate.source)
    if match:
      self.dropped['contaminated'] += 1
      self.contaminated_by[match] += 1
      return None
    return record


def trace_manifest(dropped: collections.Counter, contaminated_by: collections.Counter,
                   candidates: int, eval_programs: int, counts: collections.Counter,
                   cfg: TraceBuildConfig, items: int, seconds: float) -> dict:
  """The statistics of a trace build (merged into manifest.json)."""
  dropped = {r: dropped.get(r, 0) for r in DROP_REASONS} | {
      r: n for r, n in dropped.items() if r not in DROP_REASONS}
  traced = candidates
  return {
      'runner': cfg.runner, 'workers': cfg.workers, 'items': items, 'candidates': traced,
      'kept': traced - sum(dropped.values()), 'dropped': dropped,
      'not_traced': {k: counts.get(k, 0) for k in ('unsupported', 'capped')},
      'tests': {k[len('tests_'):]: n for k, n in sorted(counts.items())
                if k.startswith('tests_')},
      'sessions_failed': {k[len('session_'):]: n for k, n in sorted(counts.items())
                          if k.startswith('session_')},
      'dedup': {'duplicates': dropped['duplicate'],
                'key': 'sha256(normalised source, function, inputs, sha256(trace))'},
      'decontamination': {'eval_programs': eval_programs, 'ngram': cfg.ngram,
                          'threshold': cfg.contamination_threshold,
                          'contaminated': dropped['contaminated'],
                          'by_program': dict(sorted(contaminated_by.items()))},
      'seconds': round(seconds, 2), 'traces_per_s': round(traced / max(seconds, 1e-9), 2),
      'traces_per_s_per_worker': round(traced / max(seconds, 1e-9) / cfg.workers, 2)}


def build_trace_corpus(name: str, items: list, out: str, cfg: TraceBuildConfig,
                       num_shards: int = 1) -> dict:
  """Traces `items`, filters them and writes corpus `name` under `out`; returns the manifest."""
  if cfg.workers < 1:
    raise ConfigError(f'--workers={cfg.workers}: give at least 1')
  if cfg.runner != 'local':
    try:
      from cwm_jax.data import beam_build  # pylint: disable=g-import-not-at-top
    except ModuleNotFoundError as e:
      raise ConfigError(f'--runner={cfg.runner} needs apache-beam ({e}); install it with '
                        "`pip install 'cwm_jax[beam]'` or use --runner=local") from e
    return beam_build.build(name, items, out, cfg, num_shards)
  start = time.monotonic()
  flt, counts = TraceFilter(cfg), collections.Counter()

  def records():
    for candidates, item_counts in trace_locally(items, cfg):
      counts.update(item_counts)
      yield from filter(None, map(flt, candidates))

  manifest = write_array_record(records(), out, name, num_shards)
  stats = trace_manifest(flt.dropped, flt.contaminated_by, flt.candidates, flt.eval_programs,
                         counts, cfg, len(items), time.monotonic() - start)
  manifest.update(stats)
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def build_corpus(corpus: str, out: str, *, limit: int | None = None, num_shards: int = 1,
                 writer: str = 'array_record', config: TraceBuildConfig | None = None,
                 **sources) -> dict:
  """Builds `corpus` under `out`; returns the manifest. `sources` go to `trace_items`."""
  if corpus not in CORPORA:
    raise ConfigError(f'--corpus={corpus!r}: choose one of {CORPORA}')
  if writer not in WRITERS or (writer == 'tfds' and corpus in TRACE_CORPORA):
    raise ConfigError(f'--writer={writer!r}: choose one of {WRITERS} (trace corpora: '
                      'array_record only)')
  if num_shards < 1 or (limit is not None and limit < 1):
    raise ConfigError('--shards and --limit must be positive')
  if corpus in TRACE_CORPORA:
    try:
      items = trace_items(corpus, limit=limit, **sources)
    except (ValueError, OSError) as e:  # bad JSONL, missing repository, no stdlib tests, ...
      raise ConfigError(str(e)) from e
    return build_trace_corpus(corpus, items, out, config or TraceBuildConfig(), num_shards)
  if sources:
    raise ConfigError(f'{sorted(sources)} apply to trace corpora {TRACE_CORPORA} only')
  if writer == 'tfds':
    from cwm_jax.data import tfds_build  # pylint: disable=g-import-not-at-top
    return tfds_build.write_tfds(corpus, out, limit)
  return write_array_record(corpora.corpus_records(corpus, limit), out, corpus, num_shards)


def corpus_entries(mixture) -> list[dict]:
  """The embedded-corpus entries of a data mixture, validated."""
  if not isinstance(mixture, (list, tuple)):
    return []  # e.g. a {name: weight} table of a recipe config
  entries = [dict(m) for m in mixture if dict(m).get('kind') == 'corpus']
  for e in entries:
    unknown = sorted(set(e) - {'kind', 'name', 'limit', 'weight'})
    if e.get('name') not in CORPORA or unknown:
      raise ConfigError(f'data.mixture entry {e}: name must be one of {CORPORA}; fields are '
                        'kind, name, limit (files/calls/test modules cap, None = all), weight')
  return entries


def ensure_corpus(name: str, out: str, limit: int | None = None) -> str:
  """Builds corpus `name` into `out` unless `out/manifest.json` exists
  (delete `out` to rebuild, e.g. with another limit). Returns `out`."""
  if os.path.isfile(os.path.join(out, 'manifest.json')):
    return out
  tmp = f'{out}.tmp{os.getpid()}'  # renamed when complete: no half builds
  shutil.rmtree(tmp, ignore_errors=True)
  manifest = build_corpus(name, tmp, limit=limit)
  logging.info('built corpus %s (%d records, limit %s) in %s', name,
               manifest['records'], limit, out)
  try:
    os.rename(tmp, out)
  except OSError:  # built meanwhile by another process
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def resolve_corpora(mixture, data_dir: str):
  """`mixture` with each `{kind: 'corpus', name, limit, weight}` entry built
  (`ensure_corpus` into `data_dir/NAME`) and replaced by its array_record
  source; other entries and non-list mixtures are returned unchanged."""
  if not corpus_entries(mixture):
    return mixture
  out = []
  for m in map(dict, mixture):
    if m.get('kind') == 'corpus':
      path = ensure_corpus(m['name'], os.path.join(data_dir, m['name']),
                           m.get('limit'))
      m = {'kind': 'array_record', 'path': path,
           'weight': m.get('weight', 1.0)}
    out.append(m)
  return out
