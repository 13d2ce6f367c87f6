"""Functions with inputs as a trace source, and the candidate traces every source yields.

Inputs: a JSONL file of `{"source": TEXT or "path": FILE, "function": NAME, "args": [...],
"kwargs": {...}}` (a relative `path` is relative to the JSONL file; `args` is a JSON list, each
value a Python literal), and the literal calls found in the doctests of pure-Python modules
(`cwm_jax.data.traces.doctest_calls`). Each call is traced by `trace_call` in the sandbox. The
JSONL file and the files it names may be local or URLs (`cwm_jax.storage`).

A `Candidate` is one traced (or failed) call from any source; `finalize` turns a good one into the
CWM trace document, or gives the reason it is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json

from cwm_jax import storage
from cwm_jax.base import check_fields
from cwm_jax.data import dedup, formats, traces
from cwm_jax.data.traces import format as trace_format


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One call from a source: its status ('ok' or a drop reason), program and frames."""

  status: str
  source: str
  function: str
  frames: list
  origin: str
  message: str = ""


@dataclasses.dataclass(frozen=True)
class FunctionItem:
  """A work item: one call to trace."""

  call: traces.Call


def read_function_specs(path: str) -> list[traces.Call]:
  """The calls of a functions JSONL file; bad lines raise ValueError naming line and fix."""
  calls = []
  base = storage.dirname(path)
  # Universal newlines, as a text-mode file gives them.
  for i, line in enumerate(io.StringIO(storage.read_text(path), newline=None), 1):
    if not line.strip():
      continue
    where = f"{path}:{i}"
    try:
      spec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e.msg})") from e
    calls.append(_call(spec, where, base))
  return calls


def _call(spec, where: str, base: str) -> traces.Call:
  fix = (
    'each line is {"source": TEXT or "path": FILE, "function": NAME, "args": [...], '
    '"kwargs": {...}}'
  )
  if not isinstance(spec, dict) or ("source" in spec) == ("path" in spec):
    raise ValueError(f'{where}: give exactly one of "source" and "path"; {fix}')
  check_fields(
    spec, ("source", "path", "function", "args", "kwargs"), where, fix=fix, error=ValueError
  )
  if not isinstance(spec.get("function"), str):
    raise ValueError(f'{where}: no "function" string; {fix}')
  args, kwargs = spec.get("args", []), spec.get("kwargs", {})
  if not isinstance(args, list) or not isinstance(kwargs, dict):
    raise ValueError(f'{where}: "args" must be a JSON list and "kwargs" an object; {fix}')
  if "path" in spec:
    path = storage.join(base, spec["path"])
    if not storage.isfile(path):
      raise ValueError(f"{where}: no file {path}; paths are relative to the JSONL file")
    source, origin = storage.read_text(path), path
  else:
    source, origin = spec["source"], where
  if not isinstance(source, str):
    raise ValueError(f'{where}: "source" must be a string; {fix}')
  return traces.Call(source, spec["function"], tuple(args), kwargs, origin)


def doctest_items(modules) -> list[FunctionItem]:
  return [FunctionItem(c) for m in modules for c in traces.doctest_calls(m)]


def trace_function(item: FunctionItem, limits: traces.Limits) -> list[Candidate]:
  """Traces one call in the sandbox; arguments that cannot be traced give an 'error'."""
  call = item.call
  try:
    result = traces.trace_call(call.source, call.function, call.args, call.kwargs, limits)
  except (ValueError, SyntaxError) as e:
    return [Candidate("error", call.source, call.function, [], call.origin, str(e)[:500])]
  return [
    Candidate(
      result.status, call.source, call.function, result.frames, call.origin, result.message[:500]
    )
  ]


# Many traces share one program (a repository module): parse it once.
_prompt = functools.lru_cache(maxsize=1024)(trace_format.format_prompt)


def finalize(c: Candidate, max_trace_bytes: int) -> tuple[str, dict | None, str | None]:
  """(status, record, dedup key) of a candidate: the trace record when it is kept."""
  if c.status != "ok":
    return c.status, None, None
  if not c.frames:
    return "error", None, None
  try:
    prompt = _prompt(c.source, c.function)
    frames_text = trace_format.format_frames(c.frames, end=False)
  except (ValueError, SyntaxError):  # special-token text, or not a top-level def
    return "error", None, None
  if len(frames_text.encode("utf-8", "surrogatepass")) > max_trace_bytes:
    return "too_long", None, None
  record = {
    "format": "trace",
    "origin": c.origin,
    "text": formats.trace_document(prompt, frames_text),
  }
  return "ok", record, dedup.dedup_key(c.source, c.function, c.frames, frames_text)
