"""Pluggable data sources, chosen by `config.data.source`.

A source factory takes `(config, model_cfg, process_index, process_count)` and
returns an iterator of process-local batches (dicts of [B/P, T] numpy arrays,
the batch contract) with `get_state()` / `set_state()`. A grain
`DatasetIterator` is checkpointed with grain's handler; any other iterator's
state is saved as JSON and must be the same on every process.
"""

from __future__ import annotations

from collections.abc import Callable

from cwm_jax.base import ConfigError
from cwm_jax.data import pipeline
from cwm_jax.train.synthetic import SyntheticSource


def _synthetic(config, model_cfg, process_index: int, process_count: int):
  return SyntheticSource(
    batch_size=config.batch_size,
    seq_len=config.seq_len,
    vocab=model_cfg.vocab_size,
    seed=config.seed,
    mean_doc_len=config.data.mean_doc_len,
    prompt_fraction=config.data.prompt_fraction,
    process_index=process_index,
    process_count=process_count,
  )


def _grain(config, model_cfg, process_index: int, process_count: int):
  """The grain pipeline (`cwm_jax.data.pipeline.make_train_iterator`)."""
  return pipeline.make_train_iterator(config, model_cfg, process_index, process_count)


SOURCES: dict[str, Callable] = {"synthetic": _synthetic, "grain": _grain}


def check_source(config) -> None:
  if config.data.source not in SOURCES:
    raise ConfigError(f"data.source={config.data.source!r} must be one of {sorted(SOURCES)}")


def make_source(config, model_cfg, process_index: int, process_count: int):
  check_source(config)
  return SOURCES[config.data.source](config, model_cfg, process_index, process_count)
