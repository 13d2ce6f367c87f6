"""Trains a small byte-level BPE and writes it as a tiktoken rank file.

The project cannot download the release's `tokenizer.model`, so it ships a
small BPE trained on the Python standard library's own sources. Texts are
split with the Llama-3 regex (the same one `Tokenizer` uses), then the most
frequent adjacent pair is merged until `n_ranks` tokens exist. Ranks 0..255
are the single bytes; rank r > 255 is the r-th merge. Ties break on the
smaller (left id, right id) pair, so training is deterministic.

Reproduce the shipped file (Python 3.11 standard library):

  python -m cwm_jax.data.bpe --out cwm_jax/data/assets/cwm_bpe_4096.tiktoken
"""

import base64
import collections
import heapq
import os
import sysconfig
from collections.abc import Iterable, Iterator

import regex
from absl import app, flags

from cwm_jax import storage
from cwm_jax.data import tokenizer as tokenizer_lib

_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def stdlib_files() -> list[str]:
  """Sorted `.py` files of the running interpreter's standard library.

  Test suites and third-party `site-packages` are left out.
  """
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
  return files


def stdlib_sources() -> Iterator[tuple[str, str]]:
  """Yields (path, text) of the decodable stdlib sources in a fixed order."""
  for path in stdlib_files():
    with open(path, "rb") as f:
      data = f.read()
    try:
      yield path, data.decode("utf-8")
    except UnicodeDecodeError:
      continue


def stdlib_texts(max_bytes: int | None = None) -> Iterator[str]:
  """Yields decodable stdlib sources in a fixed order, up to `max_bytes` (UTF-8)."""
  total = 0
  for _, text in stdlib_sources():
    size = len(text.encode("utf-8"))
    if max_bytes is not None and total + size > max_bytes:
      return
    total += size
    yield text


def _count_words(texts: Iterable[str]) -> collections.Counter:
  split = regex.compile(tokenizer_lib.PATTERN)
  counts = collections.Counter()
  for text in texts:
    counts.update(split.findall(text))
  return counts


def _pairs(word: list[int]) -> collections.Counter:
  return collections.Counter(zip(word, word[1:]))


def _merge_word(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(new)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return out


def train_bpe(texts: Iterable[str], n_ranks: int) -> dict[bytes, int]:
  """Returns tiktoken mergeable ranks {token bytes: rank} of size <= n_ranks.

  Fewer ranks come back only when the corpus has no pair left to merge.
  """
  if n_ranks < 256:
    raise ValueError(f"n_ranks={n_ranks} < 256: every byte needs a rank")
  counts = _count_words(texts)
  words = [list(w.encode("utf-8")) for w in counts]
  freqs = list(counts.values())
  vocab = [bytes([i]) for i in range(256)]
  index = {b: i for i, b in enumerate(vocab)}
  pair_count = collections.Counter()
  where = collections.defaultdict(set)
  for wi, word in enumerate(words):
    for pair, n in _pairs(word).items():
      pair_count[pair] += n * freqs[wi]
      where[pair].add(wi)
  heap = [(-c, p) for p, c in pair_count.items()]
  heapq.heapify(heap)
  while len(vocab) < n_ranks and heap:
    neg, pair = heapq.heappop(heap)
    if pair_count.get(pair, 0) != -neg or neg == 0:
      continue  # stale heap entry
    merged = vocab[pair[0]] + vocab[pair[1]]
    new = index.get(merged)
    if new is None:
      new = index[merged] = len(vocab)
      vocab.append(merged)
    changed = set()
    for wi in where.pop(pair):
      old = words[wi]
      word = words[wi] = _merge_word(old, pair, new)
      if len(word) == len(old):
        continue  # the pair left this word in an earlier merge
      before, after = _pairs(old), _pairs(word)
      for p in before.keys() | after.keys():
        delta = after[p] - before[p]
        if delta:
          pair_count[p] += delta * freqs[wi]
          changed.add(p)
          if new in p:
            where[p].add(wi)
    for p in changed:
      if pair_count[p] > 0:
        heapq.heappush(heap, (-pair_count[p], p))
      else:
        del pair_count[p]
  return index


def write_rank_file(ranks: dict[bytes, int], path: str) -> None:
  """Writes tiktoken's format: one `base64(token) rank` line per rank (`path` local or a URL)."""
  lines = [
    f"{base64.b64encode(tok).decode()} {rank}\n"
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
  ]
  storage.write_bytes(path, "".join(lines).encode("ascii"))


def train_stdlib(out: str, n_ranks: int = 4096, max_bytes: int | None = None) -> dict[bytes, int]:
  """Trains on the standard library sources and writes the rank file."""
  ranks = train_bpe(stdlib_texts(max_bytes), n_ranks)
  write_rank_file(ranks, out)
  return ranks


def _define_flags():
  """Flags exist only when run as a program: importers get no globals."""
  flags.DEFINE_string(
    "out", None, "Rank file to write (a local path or a gs:// URL).", required=True
  )
  flags.DEFINE_integer("vocab", 4096, "Number of BPE ranks.")
  flags.DEFINE_integer("max_bytes", None, "Train on at most this many bytes of stdlib sources.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=2)
  f = flags.FLAGS
  if f.vocab < 256:
    raise app.UsageError(f"--vocab={f.vocab}: must be >= 256", exitcode=2)
  ranks = train_stdlib(f.out, f.vocab, f.max_bytes)
  print(f"wrote {len(ranks)} ranks to {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
