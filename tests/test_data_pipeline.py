"""grain pipeline: packing invariants, bad records, determinism, restore."""

import collections
import dataclasses
import json
import re

import numpy as np
import pytest

from cwm_jax.base import ConfigError
from cwm_jax.data import formats, pipeline, sources
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.kernels import masks

SEQ = 64
BAD = [  # (raw line, reason)
  (b'\xff\xfe{"text": "broken"}', "invalid_utf8"),
  (b"", "empty"),
  (b'{"format": "text", "text": ""}', "empty"),
  (json.dumps({"text": "word " * 400}).encode(), "too_long"),
  (b"[1, 2, 3]", "schema"),
  (b'{"text": 5}', "schema"),
  (b"not json at all", "schema"),
  (
    json.dumps({"format": "chat", "messages": [{"role": "robot", "content": "x"}]}).encode(),
    "schema",
  ),
  (b"[" * 100_000 + b"]" * 100_000, "schema"),  # deeper than the recursion limit
  (b'{"text": "x", "n": ' + b"7" * 5000 + b"}", "schema"),  # int over 4300 digits
  (b'{"text": "' + b"\\u12" + b'"}', "schema"),  # truncated escape
]


def _good_records(n: int, tag: str, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    words = " ".join(f"{tag}{i}w{j}" for j in range(int(rng.integers(1, 12))))
    if i % 5 == 0:
      records.append(
        formats.chat_record(
          [
            {"role": "user", "content": f"q {words}"},
            {"role": "assistant", "content": "a", "reasoning": "r"},
          ]
        )
      )
    else:
      records.append({"text": words})
  return records


def _write_jsonl(path, records, bad=()):
  lines = [json.dumps(r).encode() for r in records] + [b for b, _ in bad]
  order = np.random.default_rng(0).permutation(len(lines))
  path.write_bytes(b"\n".join(lines[i] for i in order) + b"\n")
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("jsonl")
  a, b = _good_records(60, "a", 1), _good_records(30, "b", 2)
  return {
    "a": _write_jsonl(d / "a.jsonl", a, BAD),
    "a_records": a,
    "b": _write_jsonl(d / "b.jsonl", b),
    "b_records": b,
  }


def _config(*paths, **overrides):
  cfg = pipeline.default_data_config().to_dict()
  cfg["mixture"] = [{"kind": "jsonl", "path": p} for p in paths]
  cfg["read_threads"] = 1
  cfg.update(overrides)
  return cfg


def _epoch(cfg, rows=3, **kwargs):
  it = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=rows, **kwargs)
  batches = list(it)
  return batches, it.bad_record_counts()


def _docs(tok, records):
  return [tuple(formats.example_from_record(tok, r)[0].tolist()) for r in records]


def _segments(batch):
  """(document ids, weights) of each packed segment, row by row."""
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in sorted(set(seg.tolist()) - {0}):
      idx = np.flatnonzero(seg == s)
      yield b, idx, (tuple(batch["inputs"][b, idx].tolist()) + (int(batch["targets"][b, idx[-1]]),))


@pytest.mark.parametrize("packing", ["first_fit", "concat_then_split"])
def test_packing_epoch_invariants(corpus, packing):
  tok = Tokenizer.default()
  batches, bad = _epoch(_config(corpus["a"], packing=packing, num_epochs=1))
  assert bad == collections.Counter(r for _, r in BAD)
  expected = _docs(tok, corpus["a_records"])
  weights_of = {
    d: formats.example_from_record(tok, r)[1][1:].tolist()
    for d, r in zip(expected, corpus["a_records"])
  }
  pieces = []
  for batch in batches:
    assert all(v.shape == (3, SEQ) for v in batch.values())
    pad = batch["segment_ids"] == 0
    assert not batch["weights"][pad].any()
    seg, idx = batch["segment_ids"], np.arange(SEQ)
    mask = np.asarray(
      masks.allowed(idx[:, None], idx[None, :], seg[:, :, None], seg[:, None, :], SEQ)
    )
    for b, idx, doc in _segments(batch):
      assert (np.diff(idx) == 1).all()  # one contiguous span per segment
      np.testing.assert_array_equal(batch["targets"][b, idx[:-1]], batch["inputs"][b, idx[1:]])
      # Attention: this segment's queries see exactly its own earlier keys.
      rows = mask[b][idx]
      assert rows[:, idx].sum() == len(idx) * (len(idx) + 1) // 2
      assert rows.sum() == rows[:, idx].sum()
      if packing == "first_fit":
        np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(idx)))
        assert batch["weights"][b, idx].tolist() == weights_of[doc]
      pieces.append((b, idx, doc))
  if packing == "first_fit":  # each document exactly once, whole
    assert sorted(doc for _, _, doc in pieces) == sorted(expected)
  else:  # documents may be split at row ends; the token stream is intact
    got = collections.Counter(t for _, idx, doc in pieces for t in doc[:-1])
    assert got == collections.Counter(t for d in expected for t in d[:-1])


@pytest.mark.parametrize("window", [0, 4])
def test_split_long_documents_keeps_every_weighted_token_once(tmp_path, window):
  tok = Tokenizer.default()
  rng = np.random.default_rng(3)
  records = [
    {"text": " ".join(f"w{j}x{rng.integers(99)}" for j in range(n))} for n in (3, 40, 150, 400)
  ]
  records.append(
    formats.chat_record(
      [  # weights 0 then 1, across pieces
        {"role": "user", "content": "question " * 90},
        {"role": "assistant", "content": "answer " * 120},
      ]
    )
  )
  path = _write_jsonl(tmp_path / "long.jsonl", records)
  docs = [formats.example_from_record(tok, r) for r in records]
  n_long = sum(len(ids) - 1 > SEQ for ids, _ in docs)
  assert n_long == 4
  _, skipped = _epoch(_config(path, num_epochs=1))  # default: skip
  assert skipped["too_long"] == n_long
  batches, bad = _epoch(_config(path, num_epochs=1, long_documents="split", shuffle_window=window))
  assert not any(bad.values())
  expected = []  # (inputs, targets, weights) of each piece of <= SEQ targets
  dropped = 0
  for ids, w in docs:
    for i in range(0, len(ids) - 1, SEQ):
      piece = (tuple(ids[:-1][i : i + SEQ]), tuple(ids[1:][i : i + SEQ]), tuple(w[1:][i : i + SEQ]))
      if any(piece[2]):
        expected.append(piece)
      else:  # no loss weight: dropped (only inside the long chat prompt)
        dropped += len(piece[0])
  assert dropped > 0
  got = []
  for batch in batches:
    for b in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][b]
      for s in sorted(set(seg.tolist()) - {0}):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(idx)))
        got.append(
          tuple(tuple(batch[k][b, idx].tolist()) for k in ("inputs", "targets", "weights"))
        )
  assert sorted(got) == sorted(expected)
  assert sum(len(p[0]) for p in got) + dropped == sum(len(ids) - 1 for ids, _ in docs)
  assert sum(sum(p[2]) for p in got) == sum(w[1:].sum() for _, w in docs)
  with pytest.raises(ConfigError, match="long_documents"):
    pipeline.make_iterator(_config(path, long_documents="cut"), seq_len=8, global_batch=2)


def test_same_seed_same_batches_and_mixture(corpus):
  cfg = _config(corpus["a"], corpus["b"])
  cfg["mixture"][0]["weight"], cfg["mixture"][1]["weight"] = 3.0, 1.0
  one = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=5)
  two = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=5)
  other = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=6)
  first = [next(one) for _ in range(30)]
  for batch in first:
    again = next(two)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
  assert not np.array_equal(first[0]["inputs"], next(other)["inputs"])
  tok = Tokenizer.default()
  sources = collections.Counter(
    re.search(r"\b([ab])\d+w", tok.decode(doc)).group(1)
    for batch in first
    for _, _, doc in _segments(batch)
  )
  from_a, from_b = sources["a"], sources["b"]
  assert from_a + from_b > 80
  assert 0.65 < from_a / (from_a + from_b) < 0.85  # weights 3:1


@pytest.mark.parametrize("extra", [{}, {"long_documents": "split", "shuffle_window": 8}])
def test_restore_continues_with_exact_next_batch(corpus, extra):
  cfg = _config(corpus["a"], corpus["b"], **extra)
  it = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=1)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as orbax stores it
  counts = it.bad_record_counts()
  expected = [next(it) for _ in range(5)]
  restored = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=1)
  restored.set_state(state)
  assert restored.bad_record_counts() == counts
  for want in expected:
    got = next(restored)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_restore_with_worker_processes(corpus):
  cfg = _config(corpus["a"], worker_count=2)
  it = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=3)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  counts = it.bad_record_counts()
  it.close()
  restored = pipeline.make_iterator(cfg, seq_len=SEQ, global_batch=2, seed=3)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert all(np.array_equal(want[k], got[k]) for k in want)
  assert restored.bad_record_counts() == counts
  restored.close()


def test_bad_record_counts_exact_with_worker_processes(corpus):
  """One epoch through 2 worker processes counts every bad record exactly once."""
  _, bad = _epoch(_config(corpus["a"], num_epochs=1, worker_count=2))
  assert bad == collections.Counter(r for _, r in BAD)


def test_process_shards_partition_the_corpus(corpus):
  tok = Tokenizer.default()
  cfg = _config(corpus["b"], num_epochs=1, shuffle=False)
  seen = []
  for index in range(2):
    batches, _ = _epoch(cfg, rows=2, process_index=index, process_count=2)
    seen.append(sorted(doc for batch in batches for _, _, doc in _segments(batch)))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(_docs(tok, corpus["b_records"]))


def test_default_data_config_holds_data_config_defaults():
  """The run config's data section is built from `DataConfig`: same fields, same defaults."""
  cfg = pipeline.default_data_config()
  assert set(cfg) == {f.name for f in dataclasses.fields(pipeline.DataConfig)}
  parsed = pipeline.DataConfig.from_config(
    dict(cfg.to_dict(), mixture=[{"kind": "jsonl", "path": "x.jsonl"}])
  )
  assert parsed == pipeline.DataConfig(mixture=(pipeline.Component("jsonl", "x.jsonl"),))
  assert cfg.packing == "first_fit" and cfg.num_epochs is None and cfg.mixture == []


def test_bad_config_is_a_config_error(corpus):
  with pytest.raises(ConfigError, match="unknown fields"):
    pipeline.make_iterator(_config(corpus["a"], bogus=1), seq_len=8, global_batch=2)
  with pytest.raises(ConfigError, match="data.packing"):
    pipeline.make_iterator(_config(corpus["a"], packing="best"), seq_len=8, global_batch=2)
  with pytest.raises(ConfigError, match="not divisible"):
    pipeline.make_iterator(_config(corpus["a"]), seq_len=8, global_batch=3, process_count=2)
  with pytest.raises(ConfigError, match="no .jsonl files"):
    pipeline.make_iterator(_config("/nonexistent/x.jsonl"), seq_len=8, global_batch=2)


def test_damaged_source_file_is_a_config_error(tmp_path):
  path = tmp_path / "x.array_record"
  path.write_bytes(b"not an array_record file")
  with pytest.raises(ConfigError, match="x.array_record.*rebuild"):
    sources.make_source("array_record", str(path))
