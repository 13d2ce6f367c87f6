"""CWM execution-trace text: the prompt, the frames, and their parser.

  prompt: <|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>
  call:   <|call_sep|>LOCALS<|action_sep|>LINE<|frame_sep|>
  line:   <|line_sep|>LOCALS<|action_sep|>LINE<|frame_sep|>
  return: <|return_sep|><|action_sep|>LINE<|arg_sep|>VALUE<|frame_sep|>
  raise:  <|exception_sep|><|action_sep|>LINE<|arg_sep|>VALUE<|frame_sep|>
  end:    <|end_of_text|>
SOURCE has the `def` line of the traced function marked with START_MARKER (as in
Meta's cwmdbg demo). LOCALS is the JSON object {name: encoding or '..'}; VALUE
is the JSON string holding the encoding of the returned value or raised
exception (see tracer.py). '<|' inside JSON is written '<\\u007c' so that no
value can forge a special token. LINE is the source line, indentation kept.
"""

from __future__ import annotations

import ast
import functools
import json

from cwm_jax.data.traces import pyast

BEGIN, END = "<|begin_of_text|>", "<|end_of_text|>"
CONTEXT, FRAME_SEP = "<|trace_context_start|>", "<|frame_sep|>"
ACTION_SEP, ARG_SEP = "<|action_sep|>", "<|arg_sep|>"
EVENT_TOKENS = {
  "call": "<|call_sep|>",
  "line": "<|line_sep|>",
  "return": "<|return_sep|>",
  "exception": "<|exception_sep|>",
}
SPECIAL_TOKENS = (BEGIN, END, CONTEXT, FRAME_SEP, ACTION_SEP, ARG_SEP, *EVENT_TOKENS.values())
START_MARKER = "  # << START_OF_TRACE"


def normalize_newlines(source: str) -> str:
  """Python's line numbering: '\\r\\n' and '\\r' end lines too."""
  return source.replace("\r\n", "\n").replace("\r", "\n")


def check_source(source: str) -> None:
  """Raises ValueError if `source` contains a special-token string of the trace format."""
  found = [token for token in SPECIAL_TOKENS if token in source]
  if found:
    raise ValueError(
      f"the program contains the special token text {found[0]}; such programs "
      "cannot be written as traces, remove or split that string"
    )


def entry_lineno(source: str, function: str) -> int:
  """The `def` line of `function` ('name' or 'Class.method') in `source`."""
  found = _definitions(source).get(function)
  if found is None:
    raise ValueError(
      f"no top-level function {function!r} in the program; give the name of "
      "a function defined with `def` (methods as Class.method)"
    )
  plain, lineno = found
  if not plain:
    raise ValueError(
      f"{function!r} is not a plain function (a class or an async def); trace a "
      "function defined with `def`"
    )
  return lineno


@functools.lru_cache(maxsize=16)
def _definitions(source: str) -> dict[str, tuple[bool, int]]:
  """{dotted name: (is a plain `def`, line)} of every def and class reachable by names from the
  top level (the first of a name in each body wins). Cached: a trace and its prompt look up the
  same source, and a trace build traces many functions of one program; parsing a long module
  costs more than tracing a short call."""
  out: dict[str, tuple[bool, int]] = {}

  def visit(body, prefix):
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = prefix + node.name
        if name not in out:
          out[name] = (isinstance(node, ast.FunctionDef), node.lineno)
          visit(node.body, name + ".")

  visit(pyast.parse(source).body, "")
  return out


def mark_source(source: str, function: str) -> str:
  """`source` with START_MARKER appended to the def line of `function`."""
  lines = normalize_newlines(source).split("\n")
  index = entry_lineno(source, function) - 1
  lines[index] += START_MARKER
  return "\n".join(lines)


def format_prompt(source: str, function: str) -> str:
  check_source(source)
  return BEGIN + CONTEXT + mark_source(source, function) + FRAME_SEP


def _json(value) -> str:
  return json.dumps(value, ensure_ascii=False).replace("<|", "<\\u007c")


def format_frame(frame: dict) -> str:
  event = frame["event"]
  if event not in EVENT_TOKENS:
    raise ValueError(f"unknown trace event {event!r}; expected one of {list(EVENT_TOKENS)}")
  line = frame["line"]
  check_source(line)
  if event in ("call", "line"):
    return EVENT_TOKENS[event] + _json(frame["locals"]) + ACTION_SEP + line + FRAME_SEP
  return EVENT_TOKENS[event] + ACTION_SEP + line + ARG_SEP + _json(frame["value"]) + FRAME_SEP


def format_frames(frames: list[dict], *, end: bool = True) -> str:
  """The frames as text; `end` appends <|end_of_text|> (the entry scope returned)."""
  return "".join(map(format_frame, frames)) + (END if end else "")


def format_trace(source: str, function: str, frames: list[dict]) -> str:
  """A whole trace document: prompt, frames and the end token."""
  return format_prompt(source, function) + format_frames(frames)


def _parse_frame(piece: str) -> dict | None:
  event = next((e for e, token in EVENT_TOKENS.items() if piece.startswith(token)), None)
  if event is None:
    return None
  head, found, rest = piece[len(EVENT_TOKENS[event]) :].partition(ACTION_SEP)
  if not found:
    return None
  frame = {"event": event, "lineno": None, "line": rest, "locals": None, "value": None}
  try:
    if event in ("call", "line"):
      frame["locals"] = json.loads(head)
      valid = isinstance(frame["locals"], dict) and all(
        isinstance(v, str) for v in frame["locals"].values()
      )
    else:
      frame["line"], found, value = rest.partition(ARG_SEP)
      frame["value"] = json.loads(value) if found else None
      valid = head == "" and isinstance(frame["value"], str)
  except ValueError:
    return None
  if not valid or any(token in frame["line"] for token in SPECIAL_TOKENS):
    return None
  return frame


def parse_frames(text: str) -> list[dict]:
  """Inverse of format_frames, `lineno` excepted (None): the frames before the first malformed
  or unterminated one. `text` may start with the prompt, which is skipped."""
  start = text.find(CONTEXT)
  if start >= 0:
    sep = text.find(FRAME_SEP, start)
    text = text[sep + len(FRAME_SEP) :] if sep >= 0 else ""
  frames = []
  for piece in text.split(FRAME_SEP)[:-1]:
    frame = _parse_frame(piece)
    if frame is None:
      break
    frames.append(frame)
  return frames


def resolve_locals(frames: list[dict]) -> list[dict | None]:
  """Full locals of each call/line frame ('..' replaced by the value it repeats); None for
  return/exception frames. Scopes are tracked by call/return events."""
  scopes, out = [], []
  for frame in frames:
    if frame["event"] == "call":
      scopes.append({})
    if frame["event"] in ("call", "line"):
      previous = scopes[-1] if scopes else {}
      full = {k: previous.get(k, v) if v == ".." else v for k, v in frame["locals"].items()}
      if scopes:
        scopes[-1] = full
      out.append(full)
    else:
      out.append(None)
      if frame["event"] == "return" and scopes:
        scopes.pop()
  return out
