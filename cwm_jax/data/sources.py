"""Random-access record sources for the grain pipeline.

Kinds: `array_record` (files written by `cwm_jax.data.build`, a glob or a
folder), `tfds` (a prepared TFDS builder folder, e.g. `--writer tfds`, whose
examples carry a `record` feature) and `jsonl` (one JSON object per line).
Every source yields raw record bytes; decoding happens in the pipeline so bad
records are counted, not raised.
"""

import glob
import os

import grain

from cwm_jax.base import ConfigError, require_extra

KINDS = ('array_record', 'tfds', 'jsonl')


def _files(path: str, suffix: str) -> list[str]:
  pattern = os.path.join(path, f'*{suffix}') if os.path.isdir(path) else path
  files = sorted(glob.glob(pattern))
  if not files:
    raise ConfigError(f'no {suffix} files match {path!r}: build them with '
                      '`python -m cwm_jax.data.build --corpus NAME --out DIR`')
  return files


class JsonlSource(grain.sources.RandomAccessDataSource):
  """Lines of JSONL files as bytes (line offsets indexed up front)."""

  def __init__(self, paths: list[str]):
    self._paths = list(paths)
    self._index = []  # (file number, offset, length)
    for fi, path in enumerate(self._paths):
      offset = 0
      with open(path, 'rb') as f:
        for line in f:
          self._index.append((fi, offset, len(line)))
          offset += len(line)
    self._handles = None

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> bytes:
    if self._handles is None:  # opened lazily, once per worker process
      self._handles = [open(p, 'rb') for p in self._paths]  # pylint: disable=consider-using-with
    fi, offset, length = self._index[i]
    f = self._handles[fi]
    f.seek(offset)
    return f.read(length).rstrip(b'\r\n')

  def __getstate__(self):
    return {**self.__dict__, '_handles': None}


class TfdsRecords(grain.sources.RandomAccessDataSource):
  """The `record` feature of a TFDS array_record data source, as bytes."""

  def __init__(self, builder_dir: str, split: str):
    tfds = require_extra('tensorflow_datasets', 'data', 'a data source of kind tfds')
    try:
      builder = tfds.builder_from_directory(builder_dir)
    except Exception as e:  # tfds raises several kinds for a bad folder
      raise ConfigError(f'{builder_dir!r} is not a prepared TFDS builder '
                        f'folder ({e}); build with --writer tfds') from e
    self._source = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    example = self._source[i]
    return example.get('record', example) if isinstance(example, dict) else example


def make_source(kind: str, path: str, split: str = 'train'):
  """A grain random-access source of raw records."""
  if kind == 'array_record':
    files = _files(path, '.array_record')
    try:
      return grain.sources.ArrayRecordDataSource(files)
    except Exception as e:  # array_record raises several kinds for a damaged file
      raise ConfigError(f'cannot open the array_record files {files[:3]} of {path!r} '
                        f'({type(e).__name__}: {e}); rebuild them with '
                        '`python -m cwm_jax.data.build`') from None
  if kind == 'jsonl':
    files = _files(path, '.jsonl')
    try:
      return JsonlSource(files)
    except OSError as e:
      raise ConfigError(f'cannot read the jsonl files of {path!r}: {e}') from None
  if kind == 'tfds':
    return TfdsRecords(path, split)
  raise ConfigError(f'source kind {kind!r}: choose one of {KINDS}')
