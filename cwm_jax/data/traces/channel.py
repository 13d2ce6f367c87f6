"""The record channel from the sandboxed worker to the caller: framed, nonce-tagged JSON.

A record on the wire is
  NONCE (16 bytes) | LENGTH (4 bytes, big-endian) | LENGTH bytes of UTF-8 JSON (an object)
written to a pipe that only the sandbox's own code is handed. The nonce is fresh per run and
reaches the child over a private socket, never through files or the environment. The
writing end is channel_writer.py, loaded into the worker before the program runs (its
encoder is bound then, from `_json`'s C functions); this module is the caller's end and is
never loaded in the child. `decode` is strict and never raises: every defect becomes an
error string.
"""

import json

NONCE_BYTES = 16
_HEADER = NONCE_BYTES + 4


def decode(data, nonce):
  """(records, error): the records framed in `data`; error is '' or says what is wrong."""
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
      record = json.loads(body.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as e:
      return records, "a record is not JSON (%s)" % e
    if not isinstance(record, dict):
      return records, "a record is not a JSON object"
    records.append(record)
    at += _HEADER + size
  return records, ""
