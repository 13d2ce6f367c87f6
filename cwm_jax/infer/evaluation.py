"""Evaluation: trace prediction on held-out programs and per-source perplexity.

Held-out rule: a shipped program file (`cwm_jax/data/traces/programs/NAME.py`)
is held out iff `sha256(NAME.py) % HOLD_OUT_MODULUS == 0` (`is_held_out`); the
training corpora should skip exactly those files. The rule depends on the file
name only, so adding programs never moves an old one between the sets.

Metrics (`evaluate` returns a flat dict of floats):
  trace_frame_exact   generated frames equal to the interpreter's, at the same
                      index, over all real frames (call frame excluded: it is given)
  trace_prefix        mean fraction of frames before the first divergence
  trace_return_exact  final return/exception value exact (CruxEval-Output style)
  trace_full_exact    whole trace exact
  trace_token_accuracy, trace_nll
                      teacher-forced on the true trace after the prompt: greedy
                      next-token accuracy and mean NLL per token (continuous
                      metrics that move long before exact matches do)
  ppl_SOURCE, nll_SOURCE, tokens_SOURCE
                      perplexity per corpus over its loss-weighted tokens
  trace_cases, trace_tokens, trace_frames, trace_skipped
                      how much was scored: programs (calls), teacher-forced trace
                      tokens, real frames compared, calls the interpreter could not trace

A metric over nothing (no token, frame or program scored, e.g. a `max_tokens`
shorter than every prompt) is NaN, never a perfect-looking 0 or 1, and a warning
names it (`unscored(metrics)` lists them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cwm_jax.base import ConfigError, check_fields
from cwm_jax.data import formats
from cwm_jax.data.traces import examples
from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces.examples import HOLD_OUT_MODULUS, is_held_out
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer import trace_predict
from cwm_jax.model.logprobs import token_logprobs

MIN_BUCKET = 256  # teacher-forced rows pad to a power of two >= this (few compilations)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  programs_dir: str | None = None  # default: the shipped programs
  max_programs: int = 32  # held-out calls evaluated (sorted, first N)
  max_new_tokens: int = 512  # generation budget per predicted trace
  max_tokens: int = 2048  # teacher-forced sequences are cut to this length
  batch_size: int = 8
  generate: bool = True  # exact-match metrics (needs generation; slower)
  perplexity: bool = True
  records: Mapping[str, Any] | None = None  # {source: [record dicts]} (data.formats)
  timeout_s: float = 10.0  # wall clock per traced call

  @classmethod
  def from_mapping(cls, m) -> EvalConfig:
    """From a dict or ml_collections ConfigDict; unknown keys are an error."""
    d = dict(m.to_dict() if hasattr(m, "to_dict") else m)
    check_fields(d, (f.name for f in dataclasses.fields(cls)), what="eval config keys")
    return cls(**d)

  def __post_init__(self):
    for name in ("max_programs", "max_new_tokens", "max_tokens", "batch_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"eval config {name}={getattr(self, name)} must be >= 1")


@functools.lru_cache(maxsize=4)
def held_out_cases(
  programs_dir: str | None, max_programs: int, timeout_s: float
) -> tuple[tuple, int]:
  """((source, function, frames), ...) of held-out calls traced for real, and the
  number of calls skipped because the interpreter could not trace them."""
  calls = [c for c in examples.program_calls(programs_dir) if is_held_out(c.origin)]
  if not calls:
    raise ConfigError(
      f"no held-out program in {programs_dir or examples.PROGRAMS_DIR} "
      f"(rule: sha256(file name) % {HOLD_OUT_MODULUS} == 0); add programs"
    )
  calls.sort(key=lambda c: (os.path.basename(c.origin), c.function, repr(c.args)))
  cases, skipped = [], 0
  for call in calls[:max_programs]:
    try:
      frames = trace_predict.real_trace(
        call.source, call.function, call.args, call.kwargs, Limits(timeout_s=timeout_s)
      )
    except trace_predict.TraceError:
      skipped += 1
      continue
    cases.append((call.source, call.function, tuple(frames)))
  return tuple(cases), skipped


@functools.partial(jax.jit, static_argnames="graphdef")
def _target_logprobs(graphdef, state, tokens_BT, segment_ids_BT):
  """log p(token[t+1]) and whether it is the argmax, [B, T-1] each."""
  logits_BTV = nnx.merge(graphdef, state)(tokens_BT, None, segment_ids_BT)[:, :-1]
  targets_BT = tokens_BT[:, 1:]
  return token_logprobs(logits_BTV, targets_BT), jnp.argmax(logits_BTV, axis=-1) == targets_BT


def score(model, sequences, weights, *, batch_size: int, max_tokens: int) -> np.ndarray:
  """Teacher-forced [n, 3] (sum NLL, sum weight, sum weighted greedy-correct) per sequence.

  `weights[i][t]` weighs the prediction of `sequences[i][t]` (t >= 1). Rows are
  right-padded to a power-of-two length (fewer recompilations).
  """
  graphdef, state = nnx.split(model)
  out = np.zeros((len(sequences), 3))
  for start in range(0, len(sequences), batch_size):
    seqs = [np.asarray(s[:max_tokens]) for s in sequences[start : start + batch_size]]
    ws = [np.asarray(w[:max_tokens], np.float64) for w in weights[start : start + batch_size]]
    length = max(MIN_BUCKET, 1 << (max(len(s) for s in seqs) - 1).bit_length())
    tokens = np.zeros((batch_size, length), np.int32)
    segs = np.zeros((batch_size, length), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, : len(s)], segs[i, : len(s)] = s, 1
    logp, correct = jax.device_get(_target_logprobs(graphdef, state, tokens, segs))
    for i, (s, w) in enumerate(zip(seqs, ws)):
      n = len(s) - 1
      out[start + i] = (-(logp[i, :n] * w[1:]).sum(), w[1:].sum(), (correct[i, :n] * w[1:]).sum())
  return out


def _trace_documents(tokenizer, cases):
  """Token ids of each whole trace and weights selecting the frames after the prompt."""
  seqs, weights = [], []
  for source, function, frames in cases:
    prompt = tokenizer.encode_trace(trace_predict.prompt_text(source, function, frames[0]))
    ids = tokenizer.encode_trace(trace_format.format_trace(source, function, list(frames)))
    assert ids[: len(prompt)] == prompt, "trace prompt must tokenize as a prefix of the trace"
    seqs.append(ids)
    weights.append([0.0] * len(prompt) + [1.0] * (len(ids) - len(prompt)))
  return seqs, weights


def _ratio(num: float, den: float) -> float:
  """num / den, NaN when nothing was scored (den == 0)."""
  return num / den if den > 0 else math.nan


def _mean(values) -> float:
  values = list(values)
  return float(np.mean(values)) if values else math.nan


def unscored(metrics: Mapping[str, float]) -> list[str]:
  """Names of the metrics computed over nothing (NaN)."""
  return sorted(k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v))


def trace_metrics(model, tokenizer, cases, config: EvalConfig) -> dict[str, float]:
  seqs, weights = _trace_documents(tokenizer, cases)
  sums = (
    score(model, seqs, weights, batch_size=config.batch_size, max_tokens=config.max_tokens).sum(0)
    if cases
    else np.zeros(3)
  )
  metrics = {
    "trace_cases": float(len(cases)),
    "trace_tokens": float(sums[1]),
    "trace_nll": _ratio(sums[0], sums[1]),
    "trace_token_accuracy": _ratio(sums[2], sums[1]),
  }
  if config.generate:
    preds = (
      trace_predict.predict_frames(
        model,
        tokenizer,
        [(s, f, list(fr)) for s, f, fr in cases],
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
      )
      if cases
      else []
    )
    n_frames = sum(len(p.real) for p in preds)
    metrics.update(
      trace_frames=float(n_frames),
      trace_frame_exact=_ratio(sum(p.frames_matched for p in preds), n_frames),
      trace_prefix=_mean(
        (len(p.real) if p.divergence is None else p.divergence) / len(p.real)
        for p in preds
        if p.real
      ),
      trace_return_exact=_mean(p.return_match for p in preds),
      trace_full_exact=_mean(p.divergence is None for p in preds),
    )
  return metrics


def default_records(cases) -> dict[str, list[dict]]:
  """Held-out documents per source: program text, traces, output-prediction dialogs."""
  sources = sorted({s for s, _, _ in cases})
  code = [{"format": "text", "text": s} for s in sources]
  traces = [
    {"format": "trace", "text": trace_format.format_trace(s, f, list(fr))} for s, f, fr in cases
  ]
  sft = [
    formats.chat_record(
      [
        {
          "role": "user",
          "content": f"What does `{f}` return when called with these "
          f"arguments: {fr[0]['locals']}?\n\n```python\n{s}\n```",
        },
        {"role": "assistant", "content": str(fr[-1].get("value"))},
      ]
    )
    for s, f, fr in cases
  ]
  return {"code": code, "traces": traces, "sft": sft}


def perplexity_metrics(
  model, tokenizer, records: Mapping[str, list], config: EvalConfig
) -> dict[str, float]:
  metrics = {}
  for source, recs in sorted(records.items()):
    examples_ = [formats.example_from_record(tokenizer, r) for r in recs]
    sums = score(
      model,
      [e[0] for e in examples_],
      [e[1] for e in examples_],
      batch_size=config.batch_size,
      max_tokens=config.max_tokens,
    ).sum(0)
    nll = _ratio(sums[0], sums[1])
    metrics.update(
      {
        f"nll_{source}": nll,
        f"ppl_{source}": math.exp(min(nll, 50.0)) if sums[1] > 0 else math.nan,
        f"tokens_{source}": sums[1],
      }
    )
  return metrics


def evaluate(model, tokenizer, eval_config: EvalConfig | Mapping | None = None) -> dict[str, float]:
  """All metrics for `model` (an nnx Transformer, possibly sharded) as floats."""
  config = (
    eval_config
    if isinstance(eval_config, EvalConfig)
    else EvalConfig.from_mapping(eval_config or {})
  )
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ConfigError(
      f"tokenizer has {tokenizer.vocab_size} ids but the model only "
      f"{model.cfg.vocab_size}; evaluate with the checkpoint's tokenizer"
    )
  cases, skipped = held_out_cases(config.programs_dir, config.max_programs, config.timeout_s)
  metrics = {"trace_skipped": float(skipped), **trace_metrics(model, tokenizer, cases, config)}
  if config.perplexity:
    records = config.records if config.records is not None else default_records(cases)
    metrics.update(perplexity_metrics(model, tokenizer, records, config))
  metrics = {k: float(v) for k, v in metrics.items()}
  empty = unscored(metrics)
  if empty:
    logging.warning(
      "evaluation scored nothing for %s (reported as NaN): %d programs, %d trace "
      "tokens; raise max_tokens / max_programs",
      ", ".join(empty),
      metrics["trace_cases"],
      metrics["trace_tokens"],
    )
  return metrics
