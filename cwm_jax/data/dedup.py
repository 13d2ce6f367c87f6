"""Exact deduplication of traces and n-gram decontamination against evaluation programs.

Dedup key: sha256 over the normalised source (newlines unified, trailing spaces and blank lines
removed), the entry function, the inputs (the locals of the entry's `call` frame, i.e. the
argument encodings) and the sha256 of the formatted frames. Two traces with the same key are the
same document; the first in build order is kept.

Decontamination: a source is contaminated by an evaluation program when it contains at least
`threshold` of that program's distinct code-token n-grams (at least one), tokens being Python's
NAME/OP/NUMBER/STRING tokens (comments and layout ignored). The evaluation set is the held-out
shipped programs (`cwm_jax.data.traces.examples.is_held_out`) plus any files, folders of `.py`
files or JSONL files (`source` or `text` per line) the user names, local paths or URLs
(`cwm_jax.storage`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import math
import os
import re
import tokenize

from cwm_jax import storage
from cwm_jax.data.traces import examples
from cwm_jax.data.traces import format as trace_format

_KEPT_TOKENS = (tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.STRING)
_FALLBACK = re.compile(r"\w+|[^\w\s]")


@functools.lru_cache(maxsize=1024)
def _source_digest(source: str) -> str:
  return hashlib.sha256(normalize_source(source).encode("utf-8", "surrogatepass")).hexdigest()


def normalize_source(source: str) -> str:
  lines = trace_format.normalize_newlines(source).split("\n")
  return "\n".join(line.rstrip() for line in lines if line.strip())


def dedup_key(source: str, function: str, frames: list[dict], frames_text: str) -> str:
  """The exact-duplicate key of one trace (see the module docstring)."""
  inputs = json.dumps(frames[0].get("locals") if frames else None, sort_keys=True)
  h = hashlib.sha256()
  for part in (
    _source_digest(source),
    function,
    inputs,
    hashlib.sha256(frames_text.encode("utf-8", "surrogatepass")).hexdigest(),
  ):
    h.update(part.encode("utf-8", "surrogatepass") + b"\0")
  return h.hexdigest()


def code_tokens(text: str) -> list[str]:
  """Python tokens that carry content; a regex split where the text does not tokenize."""
  try:
    return [
      t.string
      for t in tokenize.generate_tokens(io.StringIO(text).readline)
      if t.type in _KEPT_TOKENS
    ]
  except (tokenize.TokenError, IndentationError, SyntaxError):
    return _FALLBACK.findall(text)


def _ngrams(tokens: list[str], n: int) -> set[int]:
  return {hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


class Decontaminator:
  """Finds sources that overlap an evaluation program by n-grams."""

  def __init__(self, eval_docs: dict[str, str], *, n: int = 13, threshold: float = 0.1):
    if n < 1 or not 0 < threshold <= 1:
      raise ValueError(
        f"decontamination needs n >= 1 and 0 < threshold <= 1 (got n={n}, threshold={threshold})"
      )
    self.n, self.threshold = n, threshold
    self.index = collections.defaultdict(set)
    self.needed = {}
    for name, text in eval_docs.items():
      grams = _ngrams(code_tokens(text), n)
      if not grams:
        continue
      self.needed[name] = max(1, math.ceil(threshold * len(grams)))
      for g in grams:
        self.index[g].add(name)
    self.match = functools.lru_cache(maxsize=256)(self._match)

  def _match(self, source: str) -> str | None:
    """The first evaluation program `source` is contaminated by, or None."""
    shared = collections.Counter()
    for g in _ngrams(code_tokens(source), self.n):
      shared.update(self.index.get(g, ()))
    hits = sorted(name for name, count in shared.items() if count >= self.needed[name])
    return hits[0] if hits else None


def held_out_programs() -> dict[str, str]:
  """The shipped programs the evaluation uses (and training must not see)."""
  docs = {}
  for call in examples.program_calls():
    if examples.is_held_out(call.origin):
      docs["held_out:" + os.path.basename(call.origin)] = call.source
  return docs


def _py_files(folder: str) -> list[str]:
  """The `.py` files under `folder` (local or URL), sorted, subfolders included."""
  out = []
  for name in storage.listdir(folder):
    path = storage.join(folder, name)
    if storage.isdir(path):
      out += _py_files(path)
    elif name.endswith(".py"):
      out.append(path)
  return out


def read_eval_set(paths) -> dict[str, str]:
  """Evaluation documents from .py files, folders of .py files and JSONL files."""
  docs = {}
  for path in paths:
    if storage.isdir(path):
      docs.update(read_eval_set(_py_files(path)))
    elif path.endswith(".jsonl") and storage.isfile(path):
      # Universal newlines, as a text-mode file gives them.
      lines = io.StringIO(storage.read_text(path), newline=None)
      for i, line in enumerate(lines, 1):
        if line.strip():
          item = json.loads(line)
          text = item.get("source") or item.get("text") if isinstance(item, dict) else None
          if not isinstance(text, str):
            raise ValueError(
              f'{path}:{i}: an evaluation JSONL line needs a "source" or "text" string'
            )
          docs[f"{path}:{i}"] = text
    elif storage.isfile(path):
      docs[path] = storage.read_bytes(path).decode("utf-8", errors="replace")
    else:
      raise ValueError(
        f"evaluation set {path!r} does not exist; give .py files, folders or "
        'JSONL files with a "source" field'
      )
  return docs
