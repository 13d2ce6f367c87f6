"""The writing end of the record channel (channel.py), run in the sandboxed worker.

Stdlib only: the child loads this file by path (isolation.CHILD_MODULES). `Writer.send`
frames a record as channel.py describes (nonce | 4-byte length | UTF-8 JSON) and writes it
to the record pipe. The encoder is built when this module loads, before the program runs,
from the C functions of CPython's `_json` (`make_encoder`, `encode_basestring`, which
`json.encoder` itself uses): nothing it calls is looked up at send time in a module or class
the program can reach, so replacing `json.JSONEncoder`, `json.dumps`, `json.encoder.*`,
`os.write` or builtins changes no record. (child.py gives every module it loads a private
copy of the builtins, taken before the program runs.) It imports `_json` rather than the
`json` package, which would import `re` and `enum` into every run before the program: a
large share of a short run's start, for nothing the writer uses. The caller's end
(`channel.decode`) lives apart for the same reason: it needs `json.loads`.
"""

import _json
import os

_write = os.write


def _not_serializable(value):
  raise TypeError("a record holds a %s" % type(value).__name__)


# encode(record) -> str: compact JSON, non-ASCII kept, NaN refused; bound now. The arguments
# of _json.make_encoder (json.encoder.c_make_encoder): markers, default, encoder, indent,
# key and item separators, sort_keys, skipkeys, allow_nan.
_iterencode = _json.make_encoder(
  None, _not_serializable, _json.encode_basestring, None, ": ", ", ", False, False, False
)
_join = "".join


class Writer:
  """Writes records to file descriptor `fd`, each tagged with `nonce`."""

  def __init__(self, fd, nonce):
    self._fd, self._nonce = fd, nonce

  def send(self, record):
    data = _join(_iterencode(record, 0)).encode("utf-8", "surrogatepass")
    view = memoryview(self._nonce + len(data).to_bytes(4, "big") + data)
    while view:
      view = view[_write(self._fd, view) :]
