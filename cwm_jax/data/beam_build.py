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
dependencies installed. apache_beam is imported here only.

The manifest equals the local build's: the counts are gathered by the pipeline, then written with
the shard list as `manifest.json` next to the shards.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from array_record.beam.arrayrecordio import WriteToArrayRecord

from cwm_jax.data import corpus_build
from cwm_jax.data import dedup
from cwm_jax.data import sources_functions as functions


def pipeline_options(cfg: corpus_build.TraceBuildConfig) -> PipelineOptions:
  args = ['--runner', cfg.runner, *cfg.pipeline_args]
  if cfg.runner == 'DirectRunner':
    if not any(a.startswith('--direct_num_workers') for a in args):
      args.append(f'--direct_num_workers={cfg.workers}')
    if not any(a.startswith('--direct_running_mode') for a in args):
      args.append('--direct_running_mode=multi_processing')
  return PipelineOptions(args)


class _Trace(beam.DoFn):
  """(index, item) -> ((index, position), candidate); counters as ('counts', (name, n))."""

  def __init__(self, cfg):
    self.cfg = cfg

  def process(self, element):
    index, item = element
    candidates, counts = corpus_build.run_item(item, self.cfg)
    if self.cfg.progress:  # the worker's stderr: the console on DirectRunner, logs elsewhere
      print(f'traced item {index}: {len(candidates)} calls', file=sys.stderr, flush=True)
    for name, n in counts.items():
      yield beam.pvalue.TaggedOutput('counts', (name, n))
    yield beam.pvalue.TaggedOutput('counts', ('candidates', len(candidates)))
    for position, candidate in enumerate(candidates):
      yield (index, position), candidate


@beam.typehints.with_output_types(beam.typehints.Tuple[str, beam.typehints.Any])
class _Finalize(beam.DoFn):
  """Formats a candidate: (dedup key, (order, source, record)), or a drop reason."""

  def __init__(self, max_trace_bytes):
    self.max_trace_bytes = max_trace_bytes

  def process(self, element):
    order, candidate = element
    status, record, key = functions.finalize(candidate, self.max_trace_bytes)
    if status != 'ok':
      yield beam.pvalue.TaggedOutput('counts', (status, 1))
      return
    yield key, (order, candidate.source, record)


class _Decontaminate(beam.DoFn):
  """Keeps the records whose source overlaps no evaluation program."""

  def __init__(self, eval_docs, n, threshold):
    self.eval_docs, self.n, self.threshold = eval_docs, n, threshold
    self.decontaminator = None

  def setup(self):
    self.decontaminator = dedup.Decontaminator(self.eval_docs, n=self.n,
                                               threshold=self.threshold)

  def process(self, element):
    _, (_, source, record) = element
    match = self.decontaminator.match(source)
    if match:
      yield beam.pvalue.TaggedOutput('counts', ('contaminated', 1))
      yield beam.pvalue.TaggedOutput('counts', ('contaminated_by:' + match, 1))
      return
    yield json.dumps(record, ensure_ascii=False).encode('utf-8', 'surrogatepass')


def _earliest(values):
  return min(values, key=lambda v: v[0])


def _duplicates(element):
  key, values = element
  del key
  return 'duplicate', len(values) - 1


def _add_stages(p, name, items, out, cfg, num_shards, eval_docs):
  traced = (p | 'Items' >> beam.Create(list(enumerate(items)), reshuffle=True)
            | 'Trace' >> beam.ParDo(_Trace(cfg)).with_outputs('counts', main='candidates'))
  final = (traced.candidates | 'Finalize' >> beam.ParDo(
      _Finalize(cfg.trace_limits.max_trace_bytes)).with_outputs('counts', main='ok'))
  grouped = final.ok | 'GroupByKey' >> beam.GroupByKey()
  unique = grouped | 'Earliest' >> beam.MapTuple(lambda k, vs: (k, _earliest(vs)))
  kept = unique | 'Decontaminate' >> beam.ParDo(_Decontaminate(
      eval_docs, cfg.ngram, cfg.contamination_threshold)).with_outputs('counts', main='kept')
  _ = kept.kept | 'Write' >> WriteToArrayRecord(
      f'{out}/{name}', file_name_suffix='.array_record', num_shards=num_shards,
      shard_name_template='-SSSSS-of-NNNNN')
  dups = grouped | 'CountDuplicates' >> beam.Map(_duplicates)
  _ = ((traced.counts, final.counts, dups, kept.counts) | 'AllCounts' >> beam.Flatten()
       | 'Sum' >> beam.CombinePerKey(sum) | 'ToDict' >> beam.combiners.ToDict()
       | 'Json' >> beam.Map(json.dumps)
       | 'WriteCounts' >> beam.io.WriteToText(f'{out}/{name}.counts', file_name_suffix='.json',
                                              num_shards=1, shard_name_template=''))


def build(name: str, items: list, out: str, cfg: corpus_build.TraceBuildConfig,
          num_shards: int = 1) -> dict:
  """Runs the pipeline to completion; returns the manifest (also written to out)."""
  start = time.monotonic()
  eval_docs = corpus_build.eval_programs(cfg)
  with beam.Pipeline(options=pipeline_options(cfg)) as p:
    _add_stages(p, name, items, out, cfg, num_shards, eval_docs)
  with FileSystems.open(f'{out}/{name}.counts.json') as f:
    counts = collections.Counter(json.loads(f.read().decode('utf-8') or '{}'))
  FileSystems.delete([f'{out}/{name}.counts.json'])  # the output is shards + manifest.json
  prefix = 'contaminated_by:'
  by = collections.Counter({k[len(prefix):]: n for k, n in counts.items()
                            if k.startswith(prefix)})
  dropped = collections.Counter({r: counts.get(r, 0) for r in corpus_build.DROP_REASONS})
  shards = sorted(m.path.rsplit('/', 1)[-1] for m in
                  FileSystems.match([f'{out}/{name}-*.array_record'])[0].metadata_list)
  stats = corpus_build.trace_manifest(dropped, by, counts.get('candidates', 0), len(eval_docs),
                                      counts, cfg, len(items), time.monotonic() - start)
  manifest = {'corpus': name, 'writer': 'array_record', 'records': stats['kept'],
              'shards': shards, 'schema': 'one JSON object per record, see cwm_jax.data.formats',
              **stats}
  with FileSystems.create(f'{out}/manifest.json') as f:
    f.write(json.dumps(manifest, indent=1).encode('utf-8'))
  return manifest
