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

The output folder may be local or an object-store URL (`cwm_jax.storage`). A corpus is complete
when its `manifest.json` exists: a build is staged in a local folder and published whole
(`storage.publish_dir`, the manifest uploaded last), so an interrupted build leaves no manifest.
Beam builds write their shards to the output themselves (the workers of a distributed runner
share only that location) and write the manifest last.
"""

from __future__ import annotations

import contextlib
import os

from absl import logging

from cwm_jax import storage
from cwm_jax.base import ConfigError, check_fields
from cwm_jax.data import beam_build, corpora, repo_traces, tfds_build, trace_build, traces
from cwm_jax.data import sources_functions as functions
from cwm_jax.data.trace_build import DROP_REASONS, TraceBuildConfig, write_array_record  # noqa: F401

TRACE_CORPORA = ("functions", "repo_traces")
CORPORA = corpora.CORPORA + TRACE_CORPORA
WRITERS = ("array_record", "tfds")
MANIFEST = "manifest.json"  # the commit marker: a folder without it is not a corpus


def is_corpus(out: str) -> bool:
  """True when `out` holds a complete corpus (its manifest exists)."""
  return storage.isfile(storage.join(out, MANIFEST))


def _clear(out: str) -> None:
  """Deletes the corpus at `out`, its manifest first: readers stop trusting it before any
  shard goes."""
  storage.remove(storage.join(out, MANIFEST))
  storage.remove(out)


@contextlib.contextmanager
def _publishing(out: str, *, replace: bool = True):
  """A local staging folder that becomes corpus folder `out` when the block succeeds.

  `replace` deletes a previous corpus at `out` once the new one is staged, so no shard
  of it (another shard count, another writer) is mixed into the new one. Without it a
  concurrent builder's identical corpus may already be there: locally the publish
  then fails (the caller keeps theirs), on an object store the same objects are
  written again.
  """
  with storage.publish_dir(out, marker=MANIFEST) as stage:
    yield stage
    if replace and storage.exists(out):
      _clear(out)


def trace_items(
  name: str,
  *,
  limit: int | None = None,
  functions_jsonl: str | None = None,
  doctest_modules=traces.DOCTEST_MODULES,
  programs: bool = True,
  repo: str | None = None,
  stdlib_tests=repo_traces.STDLIB_EXAMPLE,
  repo_exclude=(),
) -> list:
  """The work items of trace corpus `name`; `limit` caps calls (functions) or test modules."""
  if name == "functions":
    calls = [
      c for c in traces.program_calls() if programs and not traces.examples.is_held_out(c.origin)
    ]
    if functions_jsonl:
      calls += functions.read_function_specs(functions_jsonl)
    items = [functions.FunctionItem(c) for c in calls]
    items += functions.doctest_items(doctest_modules or ())
  elif name == "repo_traces":
    items = (
      repo_traces.repo_test_items(repo, repo_exclude)
      if repo
      else repo_traces.stdlib_test_items(stdlib_tests)
    )
  else:
    raise ConfigError(f"{name!r} is not a trace corpus; choose one of {TRACE_CORPORA}")
  return items[:limit]


def build_trace_corpus(
  name: str,
  items: list,
  out: str,
  cfg: TraceBuildConfig,
  num_shards: int = 1,
  *,
  replace: bool = True,
) -> dict:
  """Traces `items`, filters them and writes corpus `name` under `out`; returns the manifest.
  `replace`: see `_publishing`."""
  if cfg.workers < 1:
    raise ConfigError(f"--workers={cfg.workers}: give at least 1")
  if cfg.runner == "local":
    with _publishing(out, replace=replace) as stage:
      return trace_build.build_locally(name, items, stage, cfg, num_shards)
  if replace and storage.exists(out):  # Beam writes into `out` itself: no old shard may stay
    _clear(out)
  return beam_build.build(name, items, out, cfg, num_shards)


def build_corpus(
  corpus: str,
  out: str,
  *,
  limit: int | None = None,
  num_shards: int = 1,
  writer: str = "array_record",
  config: TraceBuildConfig | None = None,
  **sources,
) -> dict:
  """Builds `corpus` under `out` (a folder or URL that is new, empty or a corpus, which is
  replaced); returns the manifest. `sources` go to `trace_items`."""
  _check_args(corpus, limit, num_shards, writer)
  if storage.exists(out) and (
    not storage.isdir(out) or (storage.listdir(out) and not is_corpus(out))
  ):
    raise ConfigError(
      f"--out={out!r} exists and is not an empty folder or a corpus (no "
      "manifest.json); give a new or empty folder so no other files are mixed in"
    )
  return _build(
    corpus,
    out,
    limit=limit,
    num_shards=num_shards,
    writer=writer,
    config=config,
    replace=True,
    **sources,
  )


def _check_args(corpus: str, limit: int | None, num_shards: int, writer: str) -> None:
  if corpus not in CORPORA:
    raise ConfigError(f"--corpus={corpus!r}: choose one of {CORPORA}")
  if writer not in WRITERS or (writer == "tfds" and corpus in TRACE_CORPORA):
    raise ConfigError(
      f"--writer={writer!r}: choose one of {WRITERS} (trace corpora: array_record only)"
    )
  if num_shards < 1 or (limit is not None and limit < 1):
    raise ConfigError("--shards and --limit must be positive")


def _build(
  corpus: str,
  out: str,
  *,
  limit: int | None,
  num_shards: int,
  writer: str,
  config: TraceBuildConfig | None,
  replace: bool,
  **sources,
) -> dict:
  """Builds corpus `corpus` (arguments checked) into `out`; returns the manifest."""
  if corpus in TRACE_CORPORA:
    try:
      items = trace_items(corpus, limit=limit, **sources)
    except (ValueError, OSError) as e:  # bad JSONL, missing repository, no stdlib tests, ...
      raise ConfigError(str(e)) from e
    return build_trace_corpus(
      corpus, items, out, config or TraceBuildConfig(), num_shards, replace=replace
    )
  if sources:
    raise ConfigError(f"{sorted(sources)} apply to trace corpora {TRACE_CORPORA} only")
  with _publishing(out, replace=replace) as stage:
    if writer != "tfds":
      return write_array_record(corpora.corpus_records(corpus, limit), stage, corpus, num_shards)
    manifest = tfds_build.write_tfds(corpus, stage, limit)
    # The builder folder as readers will name it: inside `out`, not the staging folder.
    rel = os.path.relpath(str(manifest["path"]), stage)
    manifest["path"] = storage.join(storage.absolute(out), *rel.split(os.sep))
    storage.write_json(storage.join(stage, MANIFEST), manifest, indent=1)
    return manifest


def corpus_entries(mixture) -> list[dict]:
  """The embedded-corpus entries of a data mixture, validated."""
  if not isinstance(mixture, (list, tuple)):
    return []  # e.g. a {name: weight} table of a recipe config
  entries = [dict(m) for m in mixture if dict(m).get("kind") == "corpus"]
  fields = "kind, name, limit (files/calls/test modules cap, None = all), weight"
  for e in entries:
    check_fields(e, ("kind", "name", "limit", "weight"), f"data.mixture entry {e}", fix=fields)
    if e.get("name") not in CORPORA:
      raise ConfigError(f"data.mixture entry {e}: name must be one of {CORPORA}")
  return entries


def ensure_corpus(name: str, out: str, limit: int | None = None) -> str:
  """Builds corpus `name` into `out` unless `out/manifest.json` exists
  (delete `out` to rebuild, e.g. with another limit). Returns `out`.

  Every process of a run may call this at once for one shared `out`: each builds the
  same corpus and publishes it without deleting another's (see `_publishing`)."""
  if is_corpus(out):
    return out
  _check_args(name, limit, 1, "array_record")
  try:
    manifest = _build(
      name, out, limit=limit, num_shards=1, writer="array_record", config=None, replace=False
    )
  except OSError:
    if not is_corpus(out):
      raise
    return out  # built meanwhile by another process
  logging.info(
    "built corpus %s (%d records, limit %s) in %s", name, manifest["records"], limit, out
  )
  return out


def resolve_corpora(mixture, data_dir: str):
  """`mixture` with each `{kind: 'corpus', name, limit, weight}` entry built
  (`ensure_corpus` into `data_dir/NAME`) and replaced by its array_record
  source; other entries and non-list mixtures are returned unchanged."""
  if not corpus_entries(mixture):
    return mixture
  out = []
  for m in map(dict, mixture):
    if m.get("kind") == "corpus":
      path = ensure_corpus(m["name"], storage.join(data_dir, m["name"]), m.get("limit"))
      m = {"kind": "array_record", "path": path, "weight": m.get("weight", 1.0)}
    out.append(m)
  return out
