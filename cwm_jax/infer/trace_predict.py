"""Trace prediction: the model writes a program's execution trace; compare with the interpreter.

The prompt is the CWM trace prompt (`<|begin_of_text|><|trace_context_start|>SOURCE
<|frame_sep|>`) followed by the REAL call frame, whose locals carry the
arguments: the model is told what the function was called with and predicts
every later frame, ending with the entry scope's return (CruxEval-Output style
when only the returned value is scored). Frames are compared on
(event, line, locals, value); line numbers are not part of the text format.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces.driver import trace_call
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer.sampler import generate

FIELDS = ("event", "line", "locals", "value")


class TraceError(ValueError):
  """The real interpreter could not trace the call (limit hit, bad program)."""


@dataclasses.dataclass
class TracePrediction:
  real: list[dict]  # interpreter frames after the call frame
  predicted: list[dict]  # parsed model frames
  text: str  # the generated text
  finished: bool  # generation ended with <|end_of_text|>

  @property
  def divergence(self) -> int | None:
    return first_divergence(self.real, self.predicted, self.finished)

  @property
  def frames_matched(self) -> int:
    return sum(same_frame(r, p) for r, p in zip(self.real, self.predicted))

  @property
  def return_match(self) -> bool:
    """The entry scope's final event and value (return or exception) are right."""
    return (
      self.finished
      and bool(self.predicted)
      and bool(self.real)
      and outcome(self.predicted[-1]) == outcome(self.real[-1])
    )


def frame_key(frame: dict) -> tuple:
  return tuple(json.dumps(frame.get(k), sort_keys=True) for k in FIELDS)


def same_frame(a: dict, b: dict) -> bool:
  return frame_key(a) == frame_key(b)


def outcome(frame: dict) -> tuple:
  return frame["event"], frame.get("value")


def first_divergence(real: list[dict], predicted: list[dict], finished: bool = True) -> int | None:
  """Index of the first frame that differs; None if the traces are identical."""
  for i, (r, p) in enumerate(zip(real, predicted)):
    if not same_frame(r, p):
      return i
  if len(real) != len(predicted) or not finished:
    return min(len(real), len(predicted))
  return None


def prompt_text(source: str, function: str, call_frame: dict) -> str:
  """The trace prompt plus the real call frame (no end token)."""
  return trace_format.format_prompt(source, function) + trace_format.format_frames(
    [call_frame], end=False
  )


def real_trace(
  source: str, function: str, args=(), kwargs=None, limits: Limits = Limits()
) -> list[dict]:
  """The interpreter's frames for `function(*args, **kwargs)`; TraceError if it failed."""
  result = trace_call(source, function, tuple(args), kwargs, limits=limits)
  if result.status != "ok" or not result.frames:
    raise TraceError(
      f"the interpreter could not trace {function}{tuple(args)!r}: "
      f"status {result.status} {result.message}".strip()
    )
  return result.frames


def predict_frames(
  model,
  tokenizer,
  cases: list[tuple[str, str, list[dict]]],
  *,
  max_new_tokens: int,
  batch_size: int = 8,
  generate_fn: Callable = generate,
) -> list[TracePrediction]:
  """Greedy trace predictions for (source, function, real frames) cases, in batches."""
  out = []
  for i in range(0, len(cases), batch_size):
    chunk = cases[i : i + batch_size]
    prompts = [tokenizer.encode_trace(prompt_text(s, f, frames[0])) for s, f, frames in chunk]
    result = generate_fn(
      model, prompts, max_new_tokens=max_new_tokens, stop_ids=tuple(tokenizer.stop_ids)
    )
    for (_, _, frames), ids in zip(chunk, result.tokens):
      text = tokenizer.decode(ids)
      out.append(
        TracePrediction(
          real=frames[1:],
          predicted=trace_format.parse_frames(text),
          text=text,
          finished=bool(ids) and ids[-1] == tokenizer.eos_id,
        )
      )
  return out


def predict_trace(
  model,
  tokenizer,
  source: str,
  function: str,
  args=(),
  kwargs=None,
  *,
  max_new_tokens: int = 1024,
  limits: Limits = Limits(),
) -> TracePrediction:
  """Traces the call for real, lets the model predict it, returns both."""
  frames = real_trace(source, function, args, kwargs, limits)
  return predict_frames(
    model, tokenizer, [(source, function, frames)], max_new_tokens=max_new_tokens
  )[0]


def _cell(frame: dict | None, width: int) -> str:
  if frame is None:
    return "".ljust(width)
  detail = frame.get("locals") if frame["event"] in ("call", "line") else frame.get("value")
  text = f"{frame['event'][:4]:4} {frame['line'].strip()}  {json.dumps(detail)}"
  return (text[: width - 1] + "~") if len(text) > width else text.ljust(width)


def side_by_side(prediction: TracePrediction, width: int = 70) -> str:
  """Real and predicted frames in two columns; '>>' marks the first divergence, '!=' later
  differing frames."""
  div = prediction.divergence
  n = max(len(prediction.real), len(prediction.predicted))
  rows = [f"    {'interpreter'.ljust(width)} | model", "-" * (2 * width + 7)]
  for i in range(n):
    real = prediction.real[i] if i < len(prediction.real) else None
    pred = prediction.predicted[i] if i < len(prediction.predicted) else None
    same = real is not None and pred is not None and same_frame(real, pred)
    mark = ">>" if i == div else ("  " if same else "!=")
    rows.append(f"{mark}{i:>3} {_cell(real, width)} | {_cell(pred, width).rstrip()}")
  if not prediction.predicted:
    rows.append(f"(no frame parsed; the model wrote {prediction.text[:300]!r})")
  verdict = "identical traces" if div is None else f"first divergence at frame {div}"
  rows.append(
    f"{verdict}; {prediction.frames_matched}/{len(prediction.real)} frames match; "
    f"return value {'matches' if prediction.return_match else 'differs'}"
    + ("" if prediction.finished else "; generation did not finish")
  )
  return "\n".join(rows)
