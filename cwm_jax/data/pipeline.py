"""grain pipeline: records -> documents -> packed [B, T] training batches.

Per mixture component: source -> this process's shard (`[i::n]`) -> shuffle
-> repeat -> parse + tokenize (`formats.example_from_record`) -> skip and
count bad records. Components are mixed by weight, packed to `seq_len`
(first-fit bins or concat-then-split), batched to `global_batch / n`
rows, renamed to the batch contract and optionally run in `worker_count`
processes (`mp_prefetch`).

Batch contract (all [B, T]): inputs, targets (int32; a document d becomes
inputs=d[:-1], targets=d[1:] before packing, so no target crosses
documents), positions (restart at 0 per document), segment_ids (1..n per
row, 0 = padding), weights (float32; 0 on padding and SFT prompt tokens).

Bad records (invalid UTF-8, empty, wrong schema, and with
`long_documents='skip'` documents longer than `seq_len`) are skipped and
counted; `bad_record_counts(it)` returns the totals. The counts
travel inside each batch (`_bad`, `_worker`, stripped by `DataIterator`) so
that they are exact with worker processes and restored with the state.

data config (ml_collections.ConfigDict or dict; see `default_data_config`):
  mixture: list of {kind: array_record|tfds|jsonl, path, split, weight}
    ({kind: corpus, name, limit, weight} entries are built and replaced by
    cwm_jax.train, see cwm_jax.data.build)
  packing: first_fit | concat_then_split
  long_documents: skip (default: a document of more than seq_len targets is
    a 'too_long' bad record) | split (it becomes consecutive pieces of at
    most seq_len targets, each packed as its own document: positions restart
    at 0 and attention does not cross pieces; weights are kept per token;
    a piece with no loss weight, e.g. inside a long SFT prompt, is dropped
    as it would train nothing)
  shuffle_window: with shuffle, shuffle documents/pieces again in windows of
    this many (0: off) so that the pieces of one long document spread over
    many batches
  num_packing_bins: first-fit bins per packing round (0: batch rows)
  tokenizer: rank file ('' = the project's shipped BPE)
  shuffle, num_epochs (None = forever), worker_count, worker_buffer_size,
  read_threads
"""

import dataclasses
import functools

import grain
import ml_collections
import numpy as np
from absl import flags

from cwm_jax.base import ConfigError, check_fields
from cwm_jax.data import formats, sources
from cwm_jax.data import tokenizer as tokenizer_lib

REASONS = ("invalid_utf8", "empty", "too_long", "schema")
PACKINGS = ("first_fit", "concat_then_split")
LONG_DOCUMENTS = ("skip", "split")
_FEATURES = ("inputs", "targets", "weights")
_FOREIGN_KEYS = ("source", "mean_doc_len", "prompt_fraction")  # train's keys


@dataclasses.dataclass(frozen=True)
class Component:
  kind: str
  path: str
  split: str = "train"
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture: tuple[Component, ...]
  packing: str = "first_fit"
  long_documents: str = "skip"
  shuffle_window: int = 0
  num_packing_bins: int = 0
  tokenizer: str = ""
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4

  @classmethod
  def from_config(cls, config) -> "DataConfig":
    """Validates a ConfigDict/dict; raises ConfigError naming bad fields."""
    d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    for key in _FOREIGN_KEYS:
      d.pop(key, None)
    check_fields(d, (f.name for f in dataclasses.fields(cls)), "data config")
    comps = []
    for i, c in enumerate(d.get("mixture") or ()):
      if dict(c).get("kind") == "corpus":
        raise ConfigError(
          f"data.mixture[{i}] is an embedded corpus entry {dict(c)}: build "
          "it first (cwm_jax.train resolves these into WORKDIR/data/NAME; "
          "or run `python -m cwm_jax.data.build --corpus NAME --out DIR` "
          "and use {kind: array_record, path: DIR})"
        )
      try:
        comps.append(Component(**dict(c)))
      except TypeError as e:
        raise ConfigError(f"data.mixture[{i}]: {e}; fields are kind, path, split, weight") from e
    d["mixture"] = tuple(comps)
    cfg = cls(**d)
    cfg.validate()
    return cfg

  def validate(self):
    errors = []
    if not self.mixture:
      errors.append("data.mixture is empty: add {kind, path}")
    for i, c in enumerate(self.mixture):
      if c.kind not in sources.KINDS:
        errors.append(f"data.mixture[{i}].kind={c.kind!r} not in {sources.KINDS}")
      if not c.weight > 0:
        errors.append(f"data.mixture[{i}].weight={c.weight} must be > 0")
    if self.packing not in PACKINGS:
      errors.append(f"data.packing={self.packing!r} not in {PACKINGS}")
    if self.long_documents not in LONG_DOCUMENTS:
      errors.append(f"data.long_documents={self.long_documents!r} not in {LONG_DOCUMENTS}")
    if self.num_epochs is not None and self.num_epochs < 1:
      errors.append("data.num_epochs must be None or >= 1")
    if min(self.worker_count, self.num_packing_bins, self.shuffle_window) < 0:
      errors.append("data.worker_count, num_packing_bins and shuffle_window must be >= 0")
    if errors:
      raise ConfigError("; ".join(errors))


def default_data_config() -> ml_collections.ConfigDict:
  """The data section of a run config: `DataConfig`'s defaults, and an empty mixture."""
  defaults = {
    f.name: f.default
    for f in dataclasses.fields(DataConfig)
    if f.default is not dataclasses.MISSING
  }
  return ml_collections.ConfigDict(dict(mixture=[], **defaults))


class Tokenize(grain.transforms.Map):
  """Raw record -> {inputs, targets, weights} or {'bad': reason index}.

  `seq_len=None` keeps documents of any length (for `SplitLong`)."""

  def __init__(self, rank_file: str, seq_len: int | None):
    self._rank_file, self._seq_len, self._tok = rank_file, seq_len, None

  def __getstate__(self):
    return {**self.__dict__, "_tok": None}

  def _tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self._tok is None:
      self._tok = (
        tokenizer_lib.Tokenizer.from_rank_file(self._rank_file)
        if self._rank_file
        else tokenizer_lib.Tokenizer.default()
      )
    return self._tok

  def map(self, raw):
    try:
      ids, weights = formats.example_from_record(self._tokenizer(), formats.parse_record(raw))
    except formats.BadRecord as e:
      return {"bad": np.int32(REASONS.index(e.reason))}
    except (ValueError, TypeError, KeyError, RecursionError, MemoryError):
      # Anything else a malformed record makes the tokenizer raise is a schema error.
      return {"bad": np.int32(REASONS.index("schema"))}
    if len(ids) < 2:
      return {"bad": np.int32(REASONS.index("empty"))}
    if self._seq_len is not None and len(ids) - 1 > self._seq_len:
      return {"bad": np.int32(REASONS.index("too_long"))}
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights[1:]}


class SplitLong(grain.experimental.FlatMapTransform):
  """A document of more than `seq_len` targets -> consecutive pieces of at
  most `seq_len` (no token repeated; pieces without loss weight are dropped,
  so no weighted target is lost; bad records pass through)."""

  max_fan_out = 2**31 - 1  # unused by IterDataset flat maps

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, element):
    n = len(element.get("inputs", ()))
    if n <= self._seq_len:
      return [element]
    return [
      {k: v[i : i + self._seq_len] for k, v in element.items()}
      for i in range(0, n, self._seq_len)
      if element["weights"][i : i + self._seq_len].any()
    ]


class _SkipBadIterator(grain.DatasetIterator):
  def __init__(self, parent):
    super().__init__(parent)
    self.counts = [0] * len(REASONS)

  def __next__(self):
    while True:
      element = next(self._parent)
      if "bad" not in element:
        return element
      self.counts[int(element["bad"])] += 1

  def get_state(self):
    return {"parent": self._parent.get_state(), "counts": list(self.counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counts = list(state["counts"])


class SkipBad(grain.IterDataset):
  """Drops `{'bad': reason}` elements, counting them per reason."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


def _skip_bad_iterators(it) -> list[_SkipBadIterator]:
  found, stack = [], [it]
  while stack:
    node = stack.pop()
    if isinstance(node, _SkipBadIterator):
      found.append(node)
    stack.extend(getattr(node, "_parents", ()))
  return found


class _AttachCountsIterator(grain.DatasetIterator):
  def __next__(self):
    batch = next(self._parent)
    if not hasattr(self, "_counters"):
      self._counters = _skip_bad_iterators(self)
    counts = np.sum([c.counts for c in self._counters], axis=0, dtype=np.int64)
    batch["_bad"] = counts.reshape(len(REASONS))
    batch["_worker"] = np.int64(self._ctx.mp_context.process_index)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class AttachCounts(grain.IterDataset):
  """Adds this worker's cumulative bad-record counts to each batch."""

  def __iter__(self):
    return _AttachCountsIterator(self._parent.__iter__())


class DataIterator(grain.DatasetIterator):
  """Batches of the contract; checkpointable; tracks bad-record counts."""

  def __init__(self, parent):
    super().__init__(parent)
    self._bad = {}  # worker index (str) -> cumulative counts

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self._bad[str(int(batch.pop("_worker")))] = batch.pop("_bad").tolist()
    return batch

  def bad_record_counts(self) -> dict[str, int]:
    totals = np.sum([[0] * len(REASONS), *self._bad.values()], axis=0)
    return {r: int(n) for r, n in zip(REASONS, totals)}

  def get_state(self):
    return {"pipeline": self._parent.get_state(), "bad_records": dict(self._bad)}

  def set_state(self, state):
    self._parent.set_state(state["pipeline"])
    self._bad = {k: list(v) for k, v in state["bad_records"].items()}

  def close(self):
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()


def bad_record_counts(it: DataIterator) -> dict[str, int]:
  """Bad records skipped so far by reason (summed over workers)."""
  return it.bad_record_counts()


def _to_contract(packed: dict, rows: int) -> dict[str, np.ndarray]:
  """Packer output (possibly a short last batch) -> the batch contract."""
  batch = {
    "inputs": packed["inputs"].astype(np.int32),
    "targets": packed["targets"].astype(np.int32),
    "positions": packed["inputs_positions"].astype(np.int32),
    "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
    "weights": packed["weights"].astype(np.float32),
  }
  short = rows - batch["inputs"].shape[0]
  if short:  # the end of a finite epoch: pad with empty rows
    batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
  return batch


def _component(
  comp: Component,
  index: int,
  cfg: DataConfig,
  tokenize,
  seq_len: int,
  process_index: int,
  process_count: int,
  seed: int,
):
  ds = grain.MapDataset.source(sources.make_source(comp.kind, comp.path, comp.split))
  ds = ds[process_index::process_count]
  if cfg.shuffle:
    ds = ds.shuffle(seed=seed + 7919 * index)
  ds = ds.repeat(cfg.num_epochs).map(tokenize)
  read = grain.ReadOptions(
    num_threads=cfg.read_threads, prefetch_buffer_size=4 * max(cfg.read_threads, 1)
  )
  ds = ds.to_iter_dataset(read)
  if cfg.long_documents == "split":
    ds = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len))
  if cfg.shuffle and cfg.shuffle_window:
    ds = grain.experimental.WindowShuffleIterDataset(
      ds, window_size=cfg.shuffle_window, seed=seed + 7919 * index + 1
    )
  return SkipBad(ds)


def _pack(ds, cfg: DataConfig, seq_len: int, rows: int, seed: int):
  lengths = {k: seq_len for k in _FEATURES}
  if cfg.packing == "first_fit":
    return grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct=lengths,
      num_packing_bins=cfg.num_packing_bins or rows,
      seed=seed,
      shuffle_bins=True,
    )
  return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)


def build_dataset(
  cfg: DataConfig, *, seq_len: int, rows: int, process_index: int, process_count: int, seed: int
):
  """The grain IterDataset of contract batches (with count side fields)."""
  tokenize = Tokenize(cfg.tokenizer, seq_len if cfg.long_documents == "skip" else None)
  parts = [
    _component(c, i, cfg, tokenize, seq_len, process_index, process_count, seed)
    for i, c in enumerate(cfg.mixture)
  ]
  ds = (
    parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, [c.weight for c in cfg.mixture])
  )
  ds = _pack(ds, cfg, seq_len, rows, seed)
  ds = ds.batch(rows, drop_remainder=False)
  ds = AttachCounts(ds.map(functools.partial(_to_contract, rows=rows)))
  if cfg.worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
      )
    )
  return ds


def make_iterator(
  data_config,
  *,
  seq_len: int,
  global_batch: int,
  process_index: int = 0,
  process_count: int = 1,
  seed: int = 0,
) -> DataIterator:
  """A checkpointable iterator of this process's [global_batch/n, seq_len]
  batches (numpy dicts of the batch contract)."""
  cfg = DataConfig.from_config(data_config)
  if global_batch % process_count:
    raise ConfigError(
      f"global_batch={global_batch} is not divisible by process_count={process_count}"
    )
  if not 0 <= process_index < process_count or seq_len < 1:
    raise ConfigError(f"bad process_index={process_index}/{process_count} or seq_len={seq_len}")
  ds = build_dataset(
    cfg,
    seq_len=seq_len,
    rows=global_batch // process_count,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
  )
  return DataIterator(iter(ds))


def make_train_iterator(config, model_cfg, process_index: int, process_count: int) -> DataIterator:
  """`data.source='grain'` hook of cwm_jax.train: uses config.data,
  config.seq_len, config.batch_size and config.seed."""
  cfg = DataConfig.from_config(config.data)
  tok = (
    tokenizer_lib.Tokenizer.from_rank_file(cfg.tokenizer)
    if cfg.tokenizer
    else tokenizer_lib.Tokenizer.default()
  )
  if tok.vocab_size > model_cfg.vocab_size:
    raise ConfigError(
      f"tokenizer vocab {tok.vocab_size} > model vocab_size "
      f"{model_cfg.vocab_size}: set model vocab_size to "
      f"{tok.vocab_size}"
    )
  return make_iterator(
    config.data,
    seq_len=config.seq_len,
    global_batch=config.batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=config.seed,
  )
