"""Corpus builds: every corpus written as ArrayRecord shards plus `manifest.json`.

Embedded corpora (`code`, `traces`, `sft`, see `corpora`) are written as their records come.
Trace corpora are built from work items in parallel, then filtered in build order:
  functions    calls of the shipped programs (held-out ones skipped), of a functions JSONL and
               of the literal doctest calls of pure-Python modules (`sources_functions`);
  repo_traces  the test modules of a repository (or of the CPython standard library's own test
               suite), each run under pytest with the tracer (`repo_traces`).
Stages (`trace_build`): trace (`workers` at a time: locally a thread pool whose threads each
drive one sandboxed process, or an Apache Beam pipeline, `beam_build`) -> drop failed calls by
status -> format (`too_long` over `max_trace_bytes`) -> exact dedup -> n-gram decontamination ->
shards. The manifest counts candidates, kept records and drops by reason, tests by outcome and
calls not traced ('unsupported' generators/nested functions, 'capped' by the per-test limit).

Training configs may name a corpus instead of a path: a mixture entry `{kind: 'corpus', name,
limit, weight}` is built once by `resolve_corpora` into DATA_DIR/NAME and replaced by
`{kind: 'array_record', path: DATA_DIR/NAME}`.
"""

from __future__ import annotations

import os
import shutil

from absl import logging

from cwm_jax.base import ConfigError
from cwm_jax.data import beam_build
from cwm_jax.data import corpora
from cwm_jax.data import repo_traces
from cwm_jax.data import sources_functions as functions
from cwm_jax.data import tfds_build
from cwm_jax.data import trace_build
from cwm_jax.data import traces
from cwm_jax.data.trace_build import DROP_REASONS, TraceBuildConfig, write_array_record  # noqa: F401

TRACE_CORPORA = ('functions', 'repo_traces')
CORPORA = corpora.CORPORA + TRACE_CORPORA
WRITERS = ('array_record', 'tfds')


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


def build_trace_corpus(name: str, items: list, out: str, cfg: TraceBuildConfig,
                       num_shards: int = 1) -> dict:
  """Traces `items`, filters them and writes corpus `name` under `out`; returns the manifest."""
  if cfg.workers < 1:
    raise ConfigError(f'--workers={cfg.workers}: give at least 1')
  if cfg.runner == 'local':
    return trace_build.build_locally(name, items, out, cfg, num_shards)
  return beam_build.build(name, items, out, cfg, num_shards)


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
  if os.path.exists(out) and (not os.path.isdir(out) or (
      os.listdir(out) and not os.path.isfile(os.path.join(out, 'manifest.json')))):
    raise ConfigError(f'--out={out!r} exists and is not an empty folder or a corpus (no '
                      'manifest.json); give a new or empty folder so no other files are mixed in')
  if corpus in TRACE_CORPORA:
    try:
      items = trace_items(corpus, limit=limit, **sources)
    except (ValueError, OSError) as e:  # bad JSONL, missing repository, no stdlib tests, ...
      raise ConfigError(str(e)) from e
    return build_trace_corpus(corpus, items, out, config or TraceBuildConfig(), num_shards)
  if sources:
    raise ConfigError(f'{sorted(sources)} apply to trace corpora {TRACE_CORPORA} only')
  if writer == 'tfds':
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
