"""A deterministic, checkpointable synthetic source of packed batches.

Batch `i` is a pure function of `(seed, i)`: rows are packed with documents of
random length whose tokens follow `(start + j * stride) % vocab`, so a model
can learn them and the loss falls. Each process yields its own rows of the
global batch; the state `{'index': i}` is the same on every process.
"""

from __future__ import annotations

import numpy as np


def _document(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
  start, stride = rng.integers(1, vocab), rng.integers(1, 8)
  return ((start + stride * np.arange(length)) % (vocab - 1) + 1).astype(np.int32)


def packed_row(
  rng: np.random.Generator,
  seq_len: int,
  vocab: int,
  mean_doc_len: int,
  prompt_fraction: float = 0.0,
) -> dict[str, np.ndarray]:
  """One packed row following the batch contract (trailing padding has weight 0)."""
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  row["weights"] = np.zeros(seq_len, np.float32)
  t, seg = 0, 0
  while t < seq_len - 1:
    n = int(min(rng.integers(2, 2 * mean_doc_len + 1), seq_len - t + 1))
    doc, seg = _document(rng, n, vocab), seg + 1
    m = n - 1  # (inputs, targets) pairs of this document
    row["inputs"][t : t + m], row["targets"][t : t + m] = doc[:-1], doc[1:]
    row["positions"][t : t + m] = np.arange(m)
    row["segment_ids"][t : t + m] = seg
    row["weights"][t : t + m] = (np.arange(m) >= int(prompt_fraction * m)).astype(np.float32)
    t += m
    if rng.random() < 0.1:
      break  # leave the rest of the row as padding
  return row


class SyntheticSource:
  """Iterator of process-local batches `{key: [B/P, T]}`; get_state/set_state resume it."""

  def __init__(
    self,
    *,
    batch_size: int,
    seq_len: int,
    vocab: int,
    seed: int = 0,
    mean_doc_len: int = 24,
    prompt_fraction: float = 0.0,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} not divisible by {process_count} processes")
    self._args = (seq_len, vocab, mean_doc_len, prompt_fraction)
    self._seed, self._batch = seed, batch_size
    local = batch_size // process_count
    self._rows = range(process_index * local, (process_index + 1) * local)
    self._index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [
      packed_row(np.random.default_rng([self._seed, self._index, r]), *self._args)
      for r in self._rows
    ]
    self._index += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self) -> dict:
    return {"index": self._index, "seed": self._seed}

  def set_state(self, state: dict) -> None:
    if state.get("seed", self._seed) != self._seed:
      raise ValueError(f"data state seed {state['seed']} != source seed {self._seed}")
    self._index = int(state["index"])
