"""Embedded corpora, buildable on any machine with no download.

Each corpus is an iterator of record dicts in the JSON schema of
`cwm_jax.data.formats`:

  code    the Python standard library's own `.py` sources ('text' records).
  traces  CWM trace documents of real calls: the literal doctest calls of
          pure-Python stdlib modules and the programs shipped with
          `cwm_jax.data.traces` ('trace' records).
  sft     chat dialogs made from the same traces: trace prediction (the
          assistant writes the frames) and output prediction (the assistant
          walks the executed lines in its reasoning, then gives the value)
          ('chat' records; only the assistant turn is in the loss).
"""

import functools
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator

from absl import logging

from cwm_jax.data import bpe, formats, traces
from cwm_jax.data.traces.examples import is_held_out

CORPORA = ("code", "traces", "sft")
_MAX_REASONING_STEPS = 48


def code_records(limit: int | None = None) -> Iterator[dict]:
  """Standard-library sources, one 'text' record per decodable file."""
  root = sysconfig.get_paths()["stdlib"]
  for path, text in itertools.islice(bpe.stdlib_sources(), limit):
    if text.strip():
      yield {"format": "text", "text": text, "source": os.path.relpath(path, root)}


def _calls(limit: int | None):
  """(Call, origin) pairs: shipped programs first (held-out files skipped), then doctests."""
  calls = [c for c in traces.program_calls() if not is_held_out(c.origin)]
  for module in traces.DOCTEST_MODULES:
    if limit is not None and len(calls) >= limit:
      break
    try:
      calls += traces.doctest_calls(module)
    except ValueError as e:
      logging.warning("skipping doctests of %s: %s", module, e)
  return calls[:limit]


def traced_calls(limit: int | None = None) -> Iterator[dict]:
  """Traces of `limit` calls that ran to completion: dicts with source,
  function, args, kwargs, origin, frames and the formatted prompt/frames.
  The last list is kept, so building `traces` then `sft` traces once."""
  yield from _traced(limit)


@functools.lru_cache(maxsize=1)
def _traced(limit: int | None) -> tuple[dict, ...]:
  return tuple(_trace_calls(limit))


def _trace_calls(limit: int | None) -> Iterator[dict]:
  for call in _calls(limit):
    result = traces.trace_call(call.source, call.function, call.args, call.kwargs)
    if result.status != "ok" or not result.frames:
      logging.info(
        "dropped %s:%s (%s) %s", call.origin, call.function, result.status, result.message[:200]
      )
      continue
    yield {
      "source": call.source,
      "function": call.function,
      "args": call.args,
      "kwargs": call.kwargs,
      "origin": call.origin,
      "frames": result.frames,
      "prompt": traces.format_prompt(call.source, call.function),
      "frames_text": traces.format_frames(result.frames, end=False),
    }


def trace_records(limit: int | None = None) -> Iterator[dict]:
  for t in traced_calls(limit):
    yield {
      "format": "trace",
      "origin": t["origin"],
      "text": formats.trace_document(t["prompt"], t["frames_text"]),
    }


def _call_text(t: dict) -> str:
  args = [repr(a) for a in t["args"]]
  args += [f"{k}={v!r}" for k, v in t["kwargs"].items()]
  return f"{t['function']}({', '.join(args)})"


def _walkthrough(frames: list[dict]) -> str:
  """Reasoning for output prediction: the executed lines and new locals."""
  steps = []
  for frame in frames[:_MAX_REASONING_STEPS]:
    line = frame["line"].strip()
    if frame["event"] in ("call", "line"):
      changed = {k: v for k, v in (frame.get("locals") or {}).items() if v != ".."}
      state = f" with {json.dumps(changed)}" if changed else ""
      steps.append(f"line {frame['lineno']}{state}: `{line}`")
    else:
      steps.append(f"{frame['event']} at `{line}`: {frame['value']}")
  if len(frames) > _MAX_REASONING_STEPS:
    steps.append(f"... {len(frames) - _MAX_REASONING_STEPS} more events")
  return "\n".join(steps)


def sft_dialogs(t: dict) -> list[dict]:
  """Trace-prediction and output-prediction dialogs for one traced call."""
  call = _call_text(t)
  code = f"```python\n{t['source']}\n```"
  last = t["frames"][-1]
  verb = "returns" if last["event"] == "return" else "raises"
  trace_q = (
    f"{code}\n\nPredict the execution trace of `{call}` in the CWM "
    "trace format, one frame per executed event."
  )
  output_q = f"{code}\n\nWhat does `{call}` return? Think step by step."
  return [
    formats.chat_record(
      [
        {"role": "user", "content": trace_q},
        {
          "role": "assistant",
          "trace": True,
          "content": t["frames_text"],
          "reasoning": (
            f"I will execute `{call}` line by line and record the locals after each event."
          ),
        },
      ]
    ),
    formats.chat_record(
      [
        {"role": "user", "content": output_q},
        {
          "role": "assistant",
          "reasoning": _walkthrough(t["frames"]),
          "content": f"`{call}` {verb} `{last['value']}`.",
        },
      ]
    ),
  ]


def sft_records(limit: int | None = None) -> Iterator[dict]:
  for t in traced_calls(limit):
    yield from sft_dialogs(t)


def corpus_records(name: str, limit: int | None = None) -> Iterator[dict]:
  """Records of corpus `name` (one of CORPORA); `limit` caps files/calls."""
  if name == "code":
    return code_records(limit)
  if name == "traces":
    return trace_records(limit)
  if name == "sft":
    return sft_records(limit)
  raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
