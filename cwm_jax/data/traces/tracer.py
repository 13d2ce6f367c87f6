"""Recorder of interpreter events, run inside the sandboxed child process.

Stdlib only: the child loads this file by path, not through the package.
One frame per `sys.settrace` event of code from the traced file:
  {'event': 'call'|'line'|'return'|'exception', 'lineno', 'line',
   'locals': {name: encoding or '..'} (call/line) or None,
   'value': encoding (return/exception) or None}
An encoding is the JSON text of a value when the value has an exact JSON form
(None, bool, int, finite float, str, and lists/str-keyed dicts of those),
otherwise its repr with memory addresses removed; long encodings are cut at
`max_value_chars` and end with TRUNCATION_MARKER. '..' marks a value whose
encoding equals the one in the previous frame of the same scope (a scope runs
from a call event to its return; call frames always list every value).
"""

import math
import sys

try:  # json.encoder's C functions, without importing json (and with it re and enum) per run
  from _json import encode_basestring as _encode_str
  from _json import encode_basestring_ascii as _encode_ascii
except ImportError:
  from json.encoder import py_encode_basestring as _encode_str
  from json.encoder import py_encode_basestring_ascii as _encode_ascii

TRUNCATION_MARKER = "...<truncated>"
# Bound when the module loads (before the program runs): the program may replace json's or
# math's functions, and none of those replacements may change an encoding.
_isfinite = math.isfinite
_join = "".join
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_ADDRESS = " at 0x"


class _Full(Exception):
  """The encoding reached its length limit."""


class _NotJson(Exception):
  """The value has no exact JSON form."""


class _Writer:
  def __init__(self, limit):
    self.parts, self.size, self.limit = [], 0, limit

  def put(self, text):
    self.parts.append(text)
    self.size += len(text)
    if self.size > self.limit:
      raise _Full


def _int_text(value):
  try:
    return repr(value)
  except ValueError:  # more digits than sys.get_int_max_str_digits()
    return None


def _json_str(text, limit):
  text = text[: limit + 1]
  out = _encode_str(text)
  try:
    out.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates: keep them as escapes
    out = _encode_ascii(text)
  return out


def _write_items(w, items, write, active, pairs=False):
  for i, item in enumerate(items):
    if i:
      w.put(", ")
    if pairs:
      write(w, item[0], active)
      w.put(": ")
      write(w, item[1], active)
    else:
      write(w, item, active)


def _write_json(w, value, active):
  kind = type(value)
  if value is None or kind is bool:
    w.put("null" if value is None else ("true" if value else "false"))
  elif kind is int:
    text = _int_text(value)
    if text is None:
      raise _NotJson
    w.put(text)
  elif kind is float:
    if not _isfinite(value):
      raise _NotJson
    w.put(repr(value))
  elif kind is str:
    w.put(_json_str(value, w.limit))
  elif kind is list or kind is dict:
    if id(value) in active:
      raise _NotJson
    active.add(id(value))
    if kind is list:
      w.put("[")
      _write_items(w, value, _write_json, active)
      w.put("]")
    else:
      w.put("{")
      for i, (key, item) in enumerate(value.items()):
        if type(key) is not str:
          raise _NotJson
        w.put((", " if i else "") + _json_str(key, w.limit) + ": ")
        _write_json(w, item, active)
      w.put("}")
    active.discard(id(value))
  else:
    raise _NotJson


_BRACKETS = {
  list: ("[", "]", "[...]"),
  tuple: ("(", ")", "(...)"),
  dict: ("{", "}", "{...}"),
  set: ("{", "}", "{...}"),
  frozenset: ("frozenset({", "})", "frozenset(...)"),
}


def _write_repr(w, value, active):
  kind = type(value)
  if kind in _BRACKETS:
    opening, closing, cycle = _BRACKETS[kind]
    if id(value) in active:
      return w.put(cycle)
    if not value and kind in (set, frozenset):
      return w.put(kind.__name__ + "()")
    active.add(id(value))
    w.put(opening)
    items = value.items() if kind is dict else value
    _write_items(w, items, _write_repr, active, pairs=kind is dict)
    w.put(",)" if kind is tuple and len(value) == 1 else closing)
    active.discard(id(value))
  elif kind in (str, bytes, bytearray):
    w.put(repr(value[: w.limit + 1]))  # cut first: the repr of a huge value is costly
  else:
    w.put(_safe_repr(value))


def _safe_repr(value):
  try:
    text = repr(value)
  except ValueError:
    text = (
      "<%s with %d bits>" % (type(value).__name__, value.bit_length())
      if isinstance(value, int)
      else "<%s object (repr failed)>" % type(value).__name__
    )
  except Exception:  # a user __repr__ may raise anything
    text = "<%s object (repr failed)>" % type(value).__name__
  return _strip_addresses(text)


def _strip_addresses(text):
  """`text` without memory addresses (' at 0x' and its hex digits), as an exact str: a
  __repr__ may return a str subclass, whose methods are the program's."""
  text = _join((text,))
  at = text.find(_ADDRESS)
  if at < 0:
    return text
  parts, start, size = [], 0, len(text)
  while at >= 0:
    end = at + len(_ADDRESS)
    while end < size and text[end] in _HEX_DIGITS:
      end += 1
    if end > at + len(_ADDRESS):
      parts.append(text[start:at])
      start = end
    at = text.find(_ADDRESS, end)
  parts.append(text[start:])
  return _join(parts)


def encode_value(value, limit=1000):
  """Returns the encoding of `value`: JSON when exact, else repr; at most `limit` chars + marker."""
  for write in (_write_json, _write_repr):
    w = _Writer(limit)
    try:
      write(w, value, set())
    except _NotJson:
      continue
    except _Full:
      return "".join(w.parts)[:limit] + TRUNCATION_MARKER
    except RecursionError:
      return "<%s nested too deeply>" % type(value).__name__
    return "".join(w.parts)
  raise AssertionError("repr encoding never gives up")


class TraceAborted(Exception):
  """Recording stopped early; `status` says why ('too_long', 'memory', 'error')."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status, self.message = status, message


class Recorder:
  """Records the events of code compiled from `filename` (whose text is `source`)."""

  def __init__(
    self, filename, source, *, max_events, max_bytes, max_value_chars, abort, settrace=sys.settrace
  ):
    self.filename = filename
    self.lines = source.split("\n")
    self.max_events, self.max_bytes, self.max_value_chars = max_events, max_bytes, max_value_chars
    self.abort = abort  # called with a TraceAborted; must not return
    self._settrace = settrace  # bound before the program ran: it may replace sys.settrace
    self.frames, self.size, self.line_events, self._last = [], 0, 0, {}

  def global_trace(self, frame, event, arg):
    if frame.f_code.co_filename != self.filename:
      return None  # library code: neither its lines nor its calls are recorded
    self._record(frame, "call", arg)
    return self.local_trace

  def local_trace(self, frame, event, arg):
    if event in ("line", "return", "exception"):
      self._record(frame, event, arg)
    return self.local_trace

  def _record(self, frame, event, arg):
    try:
      self._append(frame, event, arg)
    except TraceAborted as e:
      self.abort(e)
    except MemoryError:
      self.abort(TraceAborted("memory", "out of memory while recording the trace"))
    except Exception as e:  # a bug here would silently unset the trace function
      self.abort(TraceAborted("error", "recorder failed: %r" % e))

  def _append(self, frame, event, arg):
    lineno = frame.f_lineno
    line = self.lines[lineno - 1] if 0 < lineno <= len(self.lines) else ""
    out = {"event": event, "lineno": lineno, "line": line, "locals": None, "value": None}
    if event in ("call", "line"):
      current = {
        name: encode_value(value, self.max_value_chars)
        for name, value in frame.f_locals.items()
        if name.isidentifier()
      }
      previous = self._last.get(frame, {}) if event == "line" else {}
      out["locals"] = {k: ".." if previous.get(k) == v else v for k, v in current.items()}
      self._last[frame] = current
      self.size += sum(len(k) + len(v) + 8 for k, v in out["locals"].items())
    else:
      value = arg if event == "return" else arg[1]
      out["value"] = encode_value(value, self.max_value_chars)
      self.size += len(out["value"])
      if event == "return":
        self._last.pop(frame, None)
    self.size += len(line) + 16
    self.frames.append(out)
    self.line_events += event == "line"
    if self.line_events > self.max_events:  # CWM's rule: over 10k line events
      raise TraceAborted("too_long", "more than %d line events" % self.max_events)
    if self.size > self.max_bytes:
      raise TraceAborted("too_long", "more than %d bytes" % self.max_bytes)

  def run(self, function, args, kwargs):
    """Calls function(*args, **kwargs) under the trace; a generator result is drained."""
    self._settrace(self.global_trace)
    try:
      result = function(*args, **kwargs)
      if hasattr(result, "__next__") and hasattr(result, "gi_frame"):
        result = list(result)
    finally:
      self._settrace(None)
    return result
