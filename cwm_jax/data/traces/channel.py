"""The record channel from the sandboxed worker to the caller: framed, nonce-tagged JSON.

Stdlib only: the child loads this file by path. A record on the wire is
  NONCE (16 bytes) | LENGTH (4 bytes, big-endian) | LENGTH bytes of UTF-8 JSON (an object)
written to a pipe that only the sandbox's own code is handed. The nonce is fresh per run and
reaches the child over a private socket, never through files or the environment. The writer
builds its encoder when this module loads, before the program runs, from the C functions of
`_json` (`make_encoder`, `encode_basestring`): nothing it calls is looked up at send time in
a module or class the program can reach, so replacing `json.JSONEncoder`, `json.dumps`,
`json.encoder.*`, `os.write` or builtins changes no record. (child.py gives every module it
loads a private copy of the builtins, taken before the program runs.) The worker takes them
from `_json` itself: the `json` package would import `re` and `enum` into every run, a large
share of a short run's start, for nothing the channel uses.
`decode` (the caller's side) is strict and never raises: every defect becomes an error string.
"""

import os

try:
  import _json
except ImportError:  # an interpreter without the accelerator: the pure-Python encoder below
  _json = None

NONCE_BYTES = 16
_HEADER = NONCE_BYTES + 4
_write = os.write


def _not_serializable(value):
  raise TypeError("a record holds a %s" % type(value).__name__)


def _make_encoder():
  """encode(record) -> str: compact JSON, non-ASCII kept, NaN refused; bound now."""
  if _json is None:  # bound methods of a private encoder instance (its internals then look up
    # json.encoder globals per call)
    import json  # pylint: disable=g-import-not-at-top

    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
    return encoder.encode
  # _json.make_encoder is json.encoder.c_make_encoder (markers, default, encoder, indent,
  # key and item separators, sort_keys, skipkeys, allow_nan).
  iterencode = _json.make_encoder(
    None, _not_serializable, _json.encode_basestring, None, ": ", ", ", False, False, False
  )
  join = "".join
  return lambda record: join(iterencode(record, 0))


_encode = _make_encoder()


class Writer:
  """Writes records to file descriptor `fd`, each tagged with `nonce`."""

  def __init__(self, fd, nonce):
    self._fd, self._nonce = fd, nonce

  def send(self, record):
    data = _encode(record).encode("utf-8", "surrogatepass")
    view = memoryview(self._nonce + len(data).to_bytes(4, "big") + data)
    while view:
      view = view[_write(self._fd, view) :]


def decode(data, nonce):
  """(records, error): the records framed in `data`; error is '' or says what is wrong."""
  from json import loads  # pylint: disable=g-import-not-at-top  (the caller's, never the worker's)

  records, at = [], 0
  while at < len(data):
    if len(data) - at < _HEADER:
      return records, "a record header is cut short"
    if data[at : at + NONCE_BYTES] != nonce:
      return records, "a record does not carry this run's nonce"
    size = int.from_bytes(data[at + NONCE_BYTES : at + _HEADER], "big")
    body = data[at + _HEADER : at + _HEADER + size]
    if len(body) != size:
      return records, "a record is cut short"
    try:
      record = loads(body.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as e:
      return records, "a record is not JSON (%s)" % e
    if not isinstance(record, dict):
      return records, "a record is not a JSON object"
    records.append(record)
    at += _HEADER + size
  return records, ""
