"""trace_call: trace one call of a function of a program inside the sandbox."""

from __future__ import annotations

import ast
import dataclasses
import json

from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces import sandbox

TRACE_STATUSES = ('ok', 'timeout', 'memory', 'output_limit', 'error', 'too_long')


@dataclasses.dataclass(frozen=True)
class TraceResult:
  status: str  # one of TRACE_STATUSES; frames are empty unless 'ok'
  frames: list[dict]
  message: str = ''  # why it failed, or 'raised ...' when the call ended in an exception


def literal_text(value, what: str) -> str:
  """repr(value), checked to read back as the same Python literal."""
  text = repr(value)
  try:
    same = ast.literal_eval(text) == value
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    same = False
  if not same:
    raise ValueError(f'{what} must be Python literals (numbers, strings, bytes, None, booleans '
                     f'and tuples/lists/dicts/sets of them); got {text[:200]}')
  return text


def trace_call(source: str, function: str, args: tuple = (), kwargs: dict | None = None,
               limits: sandbox.Limits = sandbox.Limits()) -> TraceResult:
  """Runs `function(*args, **kwargs)` of the program `source` in the sandbox and records it.

  The program's top level runs first, untraced. Raises ValueError for arguments that are not
  literals or a function missing from the source; everything the program does is a status.
  """
  source = trace_format.normalize_newlines(source)
  trace_format.check_source(source)
  trace_format.entry_lineno(source, function)
  request = {'mode': 'trace', 'function': function, 'result': 'result.json',
             'args': literal_text(tuple(args), 'args'),
             'kwargs': literal_text(dict(kwargs or {}), 'kwargs'),
             'max_events': limits.max_events, 'max_bytes': limits.max_trace_bytes,
             'max_value_chars': limits.max_value_chars}
  run, data = sandbox.run_child(request, source, limits=limits, collect='result.json',
                                collect_bytes=4 * limits.max_trace_bytes + (1 << 16))
  if run.status in ('timeout', 'memory', 'output_limit'):
    return TraceResult(run.status, [], f'the traced program hit its {run.status} limit')
  if data is None:
    status = 'memory' if run.status == 'memory' else 'error'
    return TraceResult(status, [], 'the traced program exited without a trace: '
                       + run.stderr.strip()[-2000:])
  if len(data) > 4 * limits.max_trace_bytes + (1 << 16):
    return TraceResult('too_long', [], 'the recorded trace is too large')
  result = json.loads(data)
  frames = result['frames'] if result['status'] == 'ok' else []
  if len(trace_format.format_frames(frames).encode('utf-8')) > limits.max_trace_bytes:
    return TraceResult('too_long', [], f'the trace text exceeds {limits.max_trace_bytes} bytes')
  return TraceResult(result['status'], frames, result['message'])
