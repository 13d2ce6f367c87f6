"""Trace corpora on Apache Beam: the same stages as `corpus_build`, as a Beam pipeline.

  Create(items) -> Reshuffle -> Trace (sandboxed) -> Finalize (status, format, too_long)
  -> dedup (GroupByKey on the dedup key, earliest item kept) -> Decontaminate
  -> WriteToArrayRecord (array_record.beam) ; counters -> CombinePerKey(sum) -> NAME.counts.json
  (read back into manifest.json, then deleted)

Runs on any Beam runner with standard PipelineOptions (`--runner DirectRunner` locally,
DataflowRunner / FlinkRunner / SparkRunner with their usual flags; `out` must then be a
filesystem the workers share, e.g. gs://). For the DirectRunner the defaults are
`--direct_num_workers=WORKERS --direct_running_mode=multi_processing` unless given. Each worker
traces in its own sandboxed processes, so workers need this package and the traced project's
dependencies installed. apache_beam (and array_record.beam, which needs it) comes with the `data`
extra (`pip install cwm_jax[data]`) and is imported inside the functions here, so that the
package imports without it.

The manifest equals the local build's: the counts are gathered by the pipeline, then written with
the shard list as `manifest.json` next to the shards, after them (readers trust a corpus folder only
once its manifest exists). The pipeline writes through Beam's own filesystems (local or gs://);
what this module reads and writes around it goes through `cwm_jax.storage`.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
import time

from cwm_jax import storage
from cwm_jax.base import require_extra
from cwm_jax.data import dedup, trace_build
from cwm_jax.data import sources_functions as functions


def pipeline_options(cfg: trace_build.TraceBuildConfig):
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

  args = ["--runner", cfg.runner, *cfg.pipeline_args]
  if cfg.runner == "DirectRunner":
    if not any(a.startswith("--direct_num_workers") for a in args):
      args.append(f"--direct_num_workers={cfg.workers}")
    if not any(a.startswith("--direct_running_mode") for a in args):
      args.append("--direct_running_mode=multi_processing")
  return PipelineOptions(args)


def _trace(element, cfg):
  """(index, item) -> ((index, position), candidate); counters tagged 'counts'."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top

  index, item = element
  candidates, counts = trace_build.run_item(item, cfg)
  if cfg.progress:  # the worker's stderr: the console on DirectRunner, logs elsewhere
    print(f"traced item {index}: {len(candidates)} calls", file=sys.stderr, flush=True)
  for name, n in counts.items():
    yield pvalue.TaggedOutput("counts", (name, n))
  yield pvalue.TaggedOutput("counts", ("candidates", len(candidates)))
  for position, candidate in enumerate(candidates):
    yield (index, position), candidate


def _finalize(element, max_trace_bytes):
  """Formats a candidate: (dedup key, (order, source, record)), or a drop reason."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top

  order, candidate = element
  status, record, key = functions.finalize(candidate, max_trace_bytes)
  if status != "ok":
    yield pvalue.TaggedOutput("counts", (status, 1))
    return
  yield key, (order, candidate.source, record)


@functools.lru_cache(maxsize=4)
def _decontaminator(eval_docs: tuple, n: int, threshold: float) -> dedup.Decontaminator:
  return dedup.Decontaminator(dict(eval_docs), n=n, threshold=threshold)  # once per worker


def _decontaminate(element, eval_docs, n, threshold):
  """Keeps the records whose source overlaps no evaluation program, as bytes."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top

  _, (_, source, record) = element
  match = _decontaminator(eval_docs, n, threshold).match(source)
  if match:
    yield pvalue.TaggedOutput("counts", ("contaminated", 1))
    yield pvalue.TaggedOutput("counts", ("contaminated_by:" + match, 1))
    return
  yield json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _earliest(key, values):
  return key, min(values, key=lambda v: v[0])


def _duplicates(key, values):
  del key
  return "duplicate", len(values) - 1


def _add_stages(p, name, items, out, cfg, num_shards, eval_docs):
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from array_record.beam.arrayrecordio import WriteToArrayRecord  # pylint: disable=g-import-not-at-top

  keyed = beam.typehints.Tuple[str, beam.typehints.Any]
  traced = (
    p
    | "Items" >> beam.Create(list(enumerate(items)), reshuffle=True)
    | "Trace" >> beam.FlatMap(_trace, cfg).with_outputs("counts", main="candidates")
  )
  final = traced.candidates | "Finalize" >> beam.FlatMap(
    _finalize, cfg.trace_limits.max_trace_bytes
  ).with_output_types(keyed).with_outputs("counts", main="ok")
  grouped = final.ok | "GroupByKey" >> beam.GroupByKey()
  kept = (
    grouped
    | "Earliest" >> beam.MapTuple(_earliest)
    | "Decontaminate"
    >> beam.FlatMap(
      _decontaminate, tuple(sorted(eval_docs.items())), cfg.ngram, cfg.contamination_threshold
    ).with_outputs("counts", main="kept")
  )
  _ = kept.kept | "Write" >> WriteToArrayRecord(
    f"{out}/{name}",
    file_name_suffix=".array_record",
    num_shards=num_shards,
    shard_name_template="-SSSSS-of-NNNNN",
  )
  dups = grouped | "CountDuplicates" >> beam.MapTuple(_duplicates)
  _ = (
    (traced.counts, final.counts, dups, kept.counts)
    | "AllCounts" >> beam.Flatten()
    | "Sum" >> beam.CombinePerKey(sum)
    | "ToDict" >> beam.combiners.ToDict()
    | "Json" >> beam.Map(json.dumps)
    | "WriteCounts"
    >> beam.io.WriteToText(
      f"{out}/{name}.counts", file_name_suffix=".json", num_shards=1, shard_name_template=""
    )
  )


def build(
  name: str, items: list, out: str, cfg: trace_build.TraceBuildConfig, num_shards: int = 1
) -> dict:
  """Runs the pipeline to completion; returns the manifest (also written to out)."""
  beam = require_extra("apache_beam", "data", f"--runner={cfg.runner} (or use --runner=local)")
  start = time.monotonic()
  eval_docs = trace_build.eval_programs(cfg)
  with beam.Pipeline(options=pipeline_options(cfg)) as p:
    _add_stages(p, name, items, out, cfg, num_shards, eval_docs)
  counts_path = storage.join(out, f"{name}.counts.json")
  counts = collections.Counter(json.loads(storage.read_text(counts_path) or "{}"))
  storage.remove(counts_path)  # the output is shards + manifest.json
  prefix = "contaminated_by:"
  by = collections.Counter({k[len(prefix) :]: n for k, n in counts.items() if k.startswith(prefix)})
  dropped = collections.Counter({r: counts.get(r, 0) for r in trace_build.DROP_REASONS})
  shards = [storage.basename(p) for p in storage.glob(storage.join(out, f"{name}-*.array_record"))]
  stats = trace_build.trace_manifest(
    dropped,
    by,
    counts.get("candidates", 0),
    len(eval_docs),
    counts,
    cfg,
    len(items),
    time.monotonic() - start,
  )
  manifest = {
    "corpus": name,
    "writer": "array_record",
    "records": stats["kept"],
    "shards": shards,
    "schema": "one JSON object per record, see cwm_jax.data.formats",
    **stats,
  }
  storage.write_json(storage.join(out, "manifest.json"), manifest, indent=1)
  return manifest
