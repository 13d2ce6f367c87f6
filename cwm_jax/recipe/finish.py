"""The last steps of a finished schedule: a Hugging Face export and a sampled trace.

They run once every stage of the schedule is done; each is idempotent, so
re-running a finished schedule does no work twice. `schedule.finish=False`
turns them off. The summary is written to `WORKDIR/finish.json`.
"""

from __future__ import annotations

from typing import Any

from absl import logging

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint.conversion import convert
from cwm_jax.infer import loading, trace_predict
from cwm_jax.recipe import stages as stages_lib

_PROGRAM = "def f(n):\n  total = 0\n  for i in range(n):\n    total += i\n  return total\n"


def _lm_stages(config) -> list[str]:
  return [s.name for s in stages_lib.stages_from_config(config) if s.trainer == "lm"]


def _all_done(config, results: dict) -> bool:
  if config.schedule.get("only", ""):
    return False
  return all(
    n in results and (results[n] == "done" or not results[n].get("preempted"))
    for n in _lm_stages(config)
  )


def export_hf(ckpt_dir: str, out_dir: str) -> dict[str, Any]:
  """Converts the latest checkpoint in `ckpt_dir` to a Hugging Face directory."""
  if storage.isfile(storage.join(out_dir, "config.json")):
    return {"hf": out_dir, "skipped": "exists"}
  return {"hf": out_dir, **convert(ckpt_dir, out_dir, "hf")}


def sample_trace(config, ckpt_dir: str) -> dict[str, Any]:
  """Greedy trace prediction of a tiny program by the final model (text and match)."""
  try:
    model, tokenizer = loading.load_for_inference(ckpt_dir)
  except ConfigError as e:  # e.g. a synthetic-vocabulary model smaller than the tokenizer
    return {"skipped": str(e)}
  pred = trace_predict.predict_trace(
    model,
    tokenizer,
    _PROGRAM,
    "f",
    (3,),
    max_new_tokens=int(config.schedule.get("sample_tokens", 48)),
  )
  logging.info("sampled trace prediction:\n%s", trace_predict.side_by_side(pred))
  return {
    "program": _PROGRAM,
    "call": "f(3)",
    "text": pred.text,
    "frames_matched": pred.frames_matched,
    "real_frames": len(pred.real),
    "side_by_side": trace_predict.side_by_side(pred),
  }


def after_schedule(config, workdir: str, results: dict) -> dict[str, Any]:
  """Runs the finish steps after the last stage; returns {'finish': summary} (or {})."""
  if not config.schedule.get("finish", True) or not _all_done(config, results):
    return {}
  ckpt_dir = storage.join(workdir, _lm_stages(config)[-1], "checkpoints")
  summary = {"export": export_hf(ckpt_dir, storage.join(workdir, "hf"))}
  logging.info("exported %s to %s", ckpt_dir, summary["export"]["hf"])
  summary["sample"] = sample_trace(config, ckpt_dir)
  storage.write_json(storage.join(workdir, "finish.json"), summary, indent=1, default=str)
  return {"finish": summary}
