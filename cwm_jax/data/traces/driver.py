"""trace_call: trace one call of a function of a program inside the sandbox.

The trace arrives over the sandbox's record channel (nonce-tagged, see channel.py) and is
checked strictly before it is believed: exactly one record {'status', 'frames', 'message'},
a status from the known set, frames of the exact schema, events properly nested (a scope opens
with 'call' and closes with 'return'; all scopes closed at the end), line numbers inside the
source and line texts equal to the source's lines. Any defect is status 'error' with a reason.
"""

from __future__ import annotations

import dataclasses
import os
import stat

from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces import pyast, sandbox

TRACE_STATUSES = ("ok", "timeout", "memory", "output_limit", "error", "too_long")
_WORKER_STATUSES = ("ok", "error", "memory", "too_long")
_FRAME_KEYS = {"event", "lineno", "line", "locals", "value"}


@dataclasses.dataclass(frozen=True)
class TraceResult:
  status: str  # one of TRACE_STATUSES; frames are empty unless 'ok'
  frames: list[dict]
  message: str = ""  # why it failed, or 'raised ...' when the call ended in an exception


MAX_PROGRAM_BYTES = 1 << 20  # a program file read by a command line
MAX_LITERAL_CHARS = 1 << 20  # an --args / --kwargs literal


def read_program(path: str, max_bytes: int = MAX_PROGRAM_BYTES) -> str:
  """The UTF-8 text of the regular file `path`, at most `max_bytes`; ValueError otherwise.
  Opened without blocking and checked on the open descriptor: a FIFO, a device such as
  /dev/zero, a directory or a file that grows past the cap is refused, never waited on or
  read to the end."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    raise ValueError(f"cannot open the program {path}: {e.strerror}") from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise ValueError(f"the program {path} is not a regular file")
    if info.st_size > max_bytes:
      raise ValueError(f"the program {path} has {info.st_size} bytes, more than {max_bytes}")
    chunks, size = [], 0
    while size <= max_bytes:
      chunk = os.read(fd, max_bytes + 1 - size)
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
    if size > max_bytes:
      raise ValueError(f"the program {path} grew past {max_bytes} bytes while read")
  except OSError as e:
    raise ValueError(f"cannot read the program {path}: {e.strerror}") from None
  finally:
    os.close(fd)
  try:
    return b"".join(chunks).decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"the program {path} is not UTF-8 ({e.reason} at byte {e.start})") from None


def parse_literal(text: str, what: str):
  """The Python literal `text` (an --args / --kwargs value); ValueError with one line for
  anything else, including input that exhausts the parser (deep nesting, long operator
  chains: RecursionError, MemoryError)."""
  if len(text) > MAX_LITERAL_CHARS:
    raise ValueError(f"{what} is longer than {MAX_LITERAL_CHARS} characters")
  try:
    return pyast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError) as e:
    raise ValueError(f"{what} is not a Python literal ({one_line(e)}): {text[:80]!r}") from None
  except (MemoryError, RecursionError) as e:
    raise ValueError(
      f"{what} is too deeply nested or too long to parse ({type(e).__name__})"
    ) from None


def one_line(error: BaseException) -> str:
  return " ".join(str(error).split())[:200]


def literal_text(value, what: str) -> str:
  """repr(value), checked to read back as the same Python literal."""
  text = repr(value)
  try:
    same = pyast.literal_eval(text) == value
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    same = False
  if not same:
    raise ValueError(
      f"{what} must be Python literals (numbers, strings, bytes, None, booleans "
      f"and tuples/lists/dicts/sets of them); got {text[:200]}"
    )
  return text


def trace_call(
  source: str,
  function: str,
  args: tuple = (),
  kwargs: dict | None = None,
  limits: sandbox.Limits = sandbox.Limits(),
) -> TraceResult:
  """Runs `function(*args, **kwargs)` of the program `source` in the sandbox and records it.

  The program's top level runs first, untraced. Raises ValueError for arguments that are not
  literals or a function missing from the source, SandboxRefused where code cannot be
  isolated (and Limits.allow_no_isolation is off); everything the program does is a status.
  """
  source = trace_format.normalize_newlines(source)
  trace_format.check_source(source)
  trace_format.entry_lineno(source, function)
  request = {
    "mode": "trace",
    "function": function,
    # as values rebuilt from their text: plain builtins, which the request carries
    "args": pyast.literal_eval(literal_text(tuple(args), "args")),
    "kwargs": pyast.literal_eval(literal_text(dict(kwargs or {}), "kwargs")),
    "max_events": limits.max_events,
    "max_bytes": limits.max_trace_bytes,
    "max_value_chars": limits.max_value_chars,
  }
  run, records = sandbox.run_child(
    request, source, limits=limits, record_bytes=4 * limits.max_trace_bytes + (1 << 16)
  )
  if run.status in ("timeout", "memory", "output_limit"):
    return TraceResult(run.status, [], f"the traced program hit its {run.status} limit")
  if records.overflow:
    return TraceResult("too_long", [], "the recorded trace is too large")
  if records.error:
    return TraceResult("error", [], "the trace channel is damaged: " + records.error)
  if not records.records:
    status = "memory" if run.status == "memory" else "error"
    return TraceResult(
      status, [], "the traced program exited without a trace: " + run.stderr.strip()[-2000:]
    )
  result = _checked(records.records, source)
  if (
    result.status == "ok"
    and len(trace_format.format_frames(result.frames).encode("utf-8")) > limits.max_trace_bytes
  ):
    return TraceResult("too_long", [], f"the trace text exceeds {limits.max_trace_bytes} bytes")
  return result


def _checked(records: list[dict], source: str) -> TraceResult:
  """The one result record, validated against `source`; any defect is an 'error'."""
  if len(records) != 1:
    return TraceResult("error", [], f"expected one trace record, got {len(records)}")
  record = records[0]
  if set(record) != {"status", "frames", "message"}:
    return TraceResult("error", [], f"the trace record has keys {sorted(record)}")
  status, frames, message = record["status"], record["frames"], record["message"]
  if status not in _WORKER_STATUSES or not isinstance(message, str):
    return TraceResult("error", [], f"the trace record has status {str(status)[:50]!r}")
  if not isinstance(frames, list) or (status != "ok" and frames):
    return TraceResult(
      "error", [], f"the trace record's frames are not a list, or not empty with status {status!r}"
    )
  if status != "ok":
    return TraceResult(status, [], message)
  problem = frames_problem(frames, source.split("\n"))
  if problem:
    return TraceResult("error", [], "the trace is invalid: " + problem)
  return TraceResult("ok", frames, message)


def _frame_problem(frame, lines: list[str]) -> str:
  if not isinstance(frame, dict) or set(frame) != _FRAME_KEYS:
    return "a frame does not have exactly the keys " + ", ".join(sorted(_FRAME_KEYS))
  event, lineno = frame["event"], frame["lineno"]
  if event not in ("call", "line", "return", "exception"):
    return f"unknown event {str(event)[:30]!r}"
  if type(lineno) is not int or not 0 < lineno <= len(lines):
    return f"line number {str(lineno)[:30]} is outside the source"
  if frame["line"] != lines[lineno - 1]:
    return f"the text of line {lineno} differs from the source"
  if event in ("call", "line"):
    local_vars = frame["locals"]
    if (
      frame["value"] is not None
      or not isinstance(local_vars, dict)
      or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, str)
        for k, v in local_vars.items()
      )
    ):
      return f"a {event} frame needs locals {{name: text}} and no value"
  elif frame["locals"] is not None or not isinstance(frame["value"], str):
    return f"a {event} frame needs a value text and no locals"
  return ""


def frames_problem(frames: list, lines: list[str]) -> str:
  """'' if `frames` is a well-formed trace of the program with `lines`, else what is wrong."""
  if not frames:
    return "the called function produced no frames"
  depth = 0
  for i, frame in enumerate(frames):
    problem = _frame_problem(frame, lines)
    if problem:
      return f"frame {i}: {problem}"
    event = frame["event"]
    if event == "call":
      depth += 1
    elif depth == 0:
      return f"frame {i}: a {event} event outside any call"
    elif event == "return":
      depth -= 1
  if depth:
    return f"{depth} call(s) never returned (the trace was cut or tampered with)"
  return ""
