"""Builds an embedded corpus as ArrayRecord shards.

  python -m cwm_jax.data.build --corpus code --out /tmp/cwm_data/code
  python -m cwm_jax.data.build --corpus traces --out DIR --limit 50
  python -m cwm_jax.data.build --corpus sft --out DIR --writer tfds

Every record is one UTF-8 JSON object in the schema of `cwm_jax.data.formats`
(tokenizer-independent, so one build serves any rank file).

`--writer array_record` (default) writes `DIR/CORPUS-0000i-of-0000n.array_record`
directly plus `DIR/manifest.json`; read it with a pipeline source of kind
`array_record` and `path: DIR/*.array_record`.
`--writer tfds` runs a tensorflow-datasets `GeneratorBasedBuilder`
(`file_format='array_record'`, feature `record`: the JSON text) under DIR;
read it with a source of kind `tfds` and `path:` the printed builder folder.

Training configs may name a corpus instead of a path: a mixture entry
`{kind: 'corpus', name: NAME, limit: N, weight: W}` is built on demand, once,
by `resolve_corpora` (called by `cwm_jax.train` before training, with
DATA_DIR = WORKDIR/data) into `DATA_DIR/NAME/` and replaced by
`{kind: 'array_record', path: DATA_DIR/NAME}`.
"""

import json
import os
import shutil

from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module
import tensorflow_datasets as tfds

from cwm_jax.data import corpora
from cwm_jax.model.config import ConfigError

WRITERS = ('array_record', 'tfds')


def write_array_record(records, out: str, prefix: str,
                       num_shards: int = 1) -> dict:
  """Writes records round-robin into `num_shards` ArrayRecord files."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f'{prefix}-{i:05d}-of-{num_shards:05d}'
                        '.array_record') for i in range(num_shards)]
  writers = [array_record_module.ArrayRecordWriter(p, 'group_size:1')
             for p in paths]
  count = 0
  try:
    for record in records:
      data = json.dumps(record, ensure_ascii=False).encode('utf-8')
      writers[count % num_shards].write(data)
      count += 1
  finally:
    for w in writers:
      w.close()
  manifest = {'corpus': prefix, 'writer': 'array_record', 'records': count,
              'shards': [os.path.basename(p) for p in paths],
              'schema': 'one JSON object per record, see cwm_jax.data.formats'}
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


class CorpusConfig(tfds.core.BuilderConfig):
  """Which corpus and how many files/calls (None: all)."""

  def __init__(self, *, corpus: str, limit: int | None = None):
    name = corpus if limit is None else f'{corpus}_limit{limit}'
    super().__init__(name=name)
    self.corpus, self.limit = corpus, limit


class CwmCorpus(tfds.core.GeneratorBasedBuilder):
  """The cwm_jax embedded corpora as a TFDS dataset (one `train` split)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [CorpusConfig(corpus=n) for n in corpora.CORPORA]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # Nothing is downloaded, so there is no checksums file next to the code;
    # tfds's lookup of this path needs `importlib_resources` for editable
    # installs, which is not installed.
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='cwm_jax corpus; `record` is a JSON document, see '
                    'cwm_jax.data.formats.',
        features=tfds.features.FeaturesDict({'record': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    records = corpora.corpus_records(self.builder_config.corpus,
                                     self.builder_config.limit)
    for i, record in enumerate(records):
      yield i, {'record': json.dumps(record, ensure_ascii=False)}


def write_tfds(corpus: str, out: str, limit: int | None) -> dict:
  config = corpus if limit is None else CorpusConfig(corpus=corpus, limit=limit)
  builder = CwmCorpus(config=config, data_dir=out, file_format='array_record')
  builder.download_and_prepare()
  return {'corpus': corpus, 'writer': 'tfds', 'path': builder.data_dir,
          'records': builder.info.splits['train'].num_examples}


def build_corpus(corpus: str, out: str, *, limit: int | None = None,
                 num_shards: int = 1, writer: str = 'array_record') -> dict:
  """Builds `corpus` under `out`; returns a manifest dict."""
  if corpus not in corpora.CORPORA:
    raise ConfigError(f'--corpus={corpus!r}: choose one of {corpora.CORPORA}')
  if writer not in WRITERS:
    raise ConfigError(f'--writer={writer!r}: choose one of {WRITERS}')
  if num_shards < 1 or (limit is not None and limit < 1):
    raise ConfigError('--shards and --limit must be positive')
  if writer == 'tfds':
    return write_tfds(corpus, out, limit)
  return write_array_record(corpora.corpus_records(corpus, limit), out,
                            corpus, num_shards)


def corpus_entries(mixture) -> list[dict]:
  """The embedded-corpus entries of a data mixture, validated."""
  if not isinstance(mixture, (list, tuple)):
    return []  # e.g. a {name: weight} table of a recipe config
  entries = [dict(m) for m in mixture if dict(m).get('kind') == 'corpus']
  for e in entries:
    unknown = sorted(set(e) - {'kind', 'name', 'limit', 'weight'})
    if e.get('name') not in corpora.CORPORA or unknown:
      raise ConfigError(f'data.mixture entry {e}: name must be one of '
                        f'{corpora.CORPORA}; fields are kind, name, limit '
                        '(files/calls cap, None = all), weight')
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


_CORPUS = flags.DEFINE_string('corpus', None, f'One of {corpora.CORPORA}.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_LIMIT = flags.DEFINE_integer('limit', None,
                              'At most this many source files / traced calls.')
_SHARDS = flags.DEFINE_integer('shards', 1, 'ArrayRecord files to write.')
_WRITER = flags.DEFINE_string('writer', 'array_record', f'One of {WRITERS}.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}', exitcode=2)
  if not _CORPUS.value or not _OUT.value:
    raise app.UsageError('--corpus and --out are required', exitcode=2)
  try:
    manifest = build_corpus(_CORPUS.value, _OUT.value, limit=_LIMIT.value,
                            num_shards=_SHARDS.value, writer=_WRITER.value)
  except ConfigError as e:
    raise app.UsageError(str(e), exitcode=2) from e
  print(json.dumps(manifest))


if __name__ == '__main__':
  app.run(main)
