"""Optional last steps of a finished schedule: a Hugging Face export, a sample.

They run once every stage of the schedule is done and only when the modules
they need are installed (`cwm_jax.checkpoint.convert`, `cwm_jax.infer`); each
is idempotent, so re-running a finished schedule does no work twice.
`schedule.finish=False` turns them off.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from absl import logging


def _has(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def _all_done(config, results: dict) -> bool:
  from cwm_jax.train import stages as stages_lib  # pylint: disable=g-import-not-at-top
  names = [s.name for s in stages_lib.stages_from_config(config) if s.trainer == "lm"]
  if config.schedule.get("only", ""):
    return False
  return all(n in results and (results[n] == "done" or not results[n].get("preempted"))
             for n in names)


def export_hf(ckpt_dir: str, out_dir: str) -> dict[str, Any]:
  """Converts the latest checkpoint in `ckpt_dir` to a Hugging Face directory."""
  if os.path.isfile(os.path.join(out_dir, "config.json")):
    return {"hf": out_dir, "skipped": "exists"}
  from cwm_jax.checkpoint.convert import convert  # pylint: disable=g-import-not-at-top
  return {"hf": out_dir, **convert(ckpt_dir, out_dir, "hf")}


def after_schedule(config, workdir: str, results: dict) -> dict[str, Any]:
  """Runs the optional steps after the last stage; returns {'finish': summary}."""
  if not config.schedule.get("finish", True) or not _all_done(config, results):
    return {}
  from cwm_jax.train import stages as stages_lib  # pylint: disable=g-import-not-at-top
  last = [s for s in stages_lib.stages_from_config(config) if s.trainer == "lm"][-1]
  ckpt_dir = os.path.join(workdir, last.name, "checkpoints")
  summary: dict[str, Any] = {}
  if _has("cwm_jax.checkpoint.convert"):
    summary["export"] = export_hf(ckpt_dir, os.path.join(workdir, "hf"))
    logging.info("exported %s to %s", ckpt_dir, summary["export"]["hf"])
  sample = _sample_hook()
  if sample is not None:
    summary["sample"] = sample(config, workdir, ckpt_dir)
  with open(os.path.join(workdir, "finish.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return {"finish": summary}


_PROGRAM = "def f(n):\n  total = 0\n  for i in range(n):\n    total += i\n  return total\n"


def sample_trace(config, workdir: str, ckpt_dir: str) -> dict[str, Any]:
  """Greedy trace prediction of a tiny program by the final model (text and match)."""
  from cwm_jax.infer import loading, trace_predict  # pylint: disable=g-import-not-at-top
  from cwm_jax.base import ConfigError  # pylint: disable=g-import-not-at-top
  del workdir
  try:
    model, tokenizer = loading.load_for_inference(ckpt_dir)
  except ConfigError as e:  # e.g. a synthetic-vocabulary model smaller than the tokenizer
    return {"skipped": str(e)}
  pred = trace_predict.predict_trace(model, tokenizer, _PROGRAM, "f", (3,),
                                     max_new_tokens=int(config.schedule.get("sample_tokens", 48)))
  logging.info("sampled trace prediction:\n%s", trace_predict.side_by_side(pred))
  return {"program": _PROGRAM, "call": "f(3)", "text": pred.text,
          "frames_matched": pred.frames_matched, "real_frames": len(pred.real)}


def _sample_hook():
  """The trace-prediction sampler, if the inference package has landed."""
  if _has("cwm_jax.infer.trace_predict") and _has("cwm_jax.infer.loading"):
    return sample_trace
  return None
