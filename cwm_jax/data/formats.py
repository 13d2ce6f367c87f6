"""Document formats: JSON records -> token ids with per-token loss weights.

Every corpus record is one JSON object (stored as UTF-8 bytes in ArrayRecord,
TFDS or JSONL files). The `format` field picks the layout:

  {"format": "text", "text": STR}
      Plain text (code): `<|begin_of_text|>TEXT<|end_of_text|>`, all weight 1.
      `format` may be omitted for plain text.
  {"format": "trace", "text": STR}
      A CWM trace document (CWM technical report): the prompt
      `<|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>` then the
      frames; its marker strings become special tokens. All weight 1.
  {"format": "chat", "messages": [{"role": R, "content": STR,
                                   "reasoning": STR?, "trace": BOOL?}, ...]}
      A dialog in the chat format: `<|begin_of_text|>` then per message
      `<|start_header_id|>R<|end_header_id|>\\n\\nBODY<|eot_id|>`. An assistant
      body with reasoning is
      `<|reasoning_thinking_start|>REASONING<|reasoning_thinking_end|>CONTENT`.
      `trace: true` marks CONTENT as trace text whose markers are specials.
      Only assistant bodies and their `<|eot_id|>` weigh 1 (SFT: the prompt,
      headers and other roles weigh 0).

Extra fields (e.g. `source`, `meta`) are ignored.
"""

import json

import numpy as np

from cwm_jax.data.tokenizer import Tokenizer

FORMATS = ("text", "trace", "chat")
THINK_START = "<|reasoning_thinking_start|>"
THINK_END = "<|reasoning_thinking_end|>"
END_OF_TEXT = "<|end_of_text|>"


class BadRecord(ValueError):
  """A record that cannot become a document; `reason` names the kind."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def parse_record(data) -> dict:
  """UTF-8 JSON bytes (or str, or an already-parsed dict) to a record dict."""
  if isinstance(data, dict):
    record = data
  else:
    if isinstance(data, (bytes, bytearray, memoryview)):
      try:
        data = bytes(data).decode("utf-8")
      except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", str(e)) from e
    if not data.strip():
      raise BadRecord("empty", "empty record")
    try:
      record = json.loads(data)
    except (ValueError, RecursionError, MemoryError) as e:
      # JSONDecodeError, an integer of more than 4300 digits (ValueError), nesting
      # deeper than the interpreter's recursion limit, or a record too large to hold.
      raise BadRecord("schema", f"not parseable JSON: {type(e).__name__}: {str(e)[:200]}") from None
  if not isinstance(record, dict):
    raise BadRecord("schema", f"record is a {type(record).__name__}, not a JSON object")
  return record


def _field(record: dict, key: str, kind: type):
  value = record.get(key)
  if not isinstance(value, kind):
    raise BadRecord("schema", f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
  return value


def text_ids(tok: Tokenizer, text: str) -> list[int]:
  return tok.encode(text, bos=True, eos=True)


def trace_document(prompt: str, frames: str) -> str:
  """Joins a formatted trace prompt and frames into one document string."""
  doc = prompt + frames
  return doc if doc.endswith(END_OF_TEXT) else doc + END_OF_TEXT


def trace_ids(tok: Tokenizer, text: str) -> list[int]:
  ids = tok.encode_trace(text)
  if not ids or ids[0] != tok.bos_id:
    ids = [tok.bos_id] + ids
  if ids[-1] != tok.eos_id:
    ids.append(tok.eos_id)
  return ids


def _body_ids(tok: Tokenizer, message: dict) -> list[int]:
  content = _field(message, "content", str)
  body = tok.encode_trace(content) if message.get("trace") else tok.encode(content)
  reasoning = message.get("reasoning")
  if reasoning is None:
    return body
  if not isinstance(reasoning, str):
    raise BadRecord("schema", "field reasoning must be str")
  return [tok.special_id(THINK_START)] + tok.encode(reasoning) + [tok.special_id(THINK_END)] + body


def chat_example(tok: Tokenizer, messages) -> tuple[list[int], list[float]]:
  """Dialog ids and weights: 1 on assistant bodies and their end token."""
  if not isinstance(messages, list) or not messages:
    raise BadRecord("schema", "messages must be a non-empty list")
  ids, weights = [tok.bos_id], [0.0]
  for message in messages:
    if not isinstance(message, dict):
      raise BadRecord("schema", "each message must be a JSON object")
    role = _field(message, "role", str)
    try:
      header = tok.header(role)
    except ValueError as e:
      raise BadRecord("schema", str(e)) from e
    body = _body_ids(tok, message) + [tok.special_id("<|eot_id|>")]
    w = 1.0 if role == "assistant" else 0.0
    ids += header + body
    weights += [0.0] * len(header) + [w] * len(body)
  return ids, weights


def chat_record(messages: list[dict]) -> dict:
  return {"format": "chat", "messages": messages}


def example_from_record(tok: Tokenizer, record: dict) -> tuple[np.ndarray, np.ndarray]:
  """Record dict -> (ids int32 [n], weights float32 [n]); raises BadRecord."""
  fmt = record.get("format", "text")
  if fmt in ("text", "trace") and record.get("text") == "":
    raise BadRecord("empty", f"empty {fmt} record")
  if fmt == "text":
    ids = text_ids(tok, _field(record, "text", str))
    weights = [1.0] * len(ids)
  elif fmt == "trace":
    ids = trace_ids(tok, _field(record, "text", str))
    weights = [1.0] * len(ids)
  elif fmt == "chat":
    ids, weights = chat_example(tok, record.get("messages"))
  else:
    raise BadRecord("schema", f"unknown format {fmt!r}; use one of {FORMATS}")
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)
