"""Inference: KV-cache sampling, trace prediction and evaluation.

The evaluation entry point is `cwm_jax.infer.evaluation.evaluate` (not re-exported
here: the name would shadow its module).
"""

from cwm_jax.infer.cache import KVCache, cache_layout, init_cache
from cwm_jax.infer.evaluation import EvalConfig, is_held_out
from cwm_jax.infer.sampler import GenerateResult, generate
from cwm_jax.infer.trace_predict import TracePrediction, predict_trace, side_by_side

__all__ = [
  "EvalConfig",
  "GenerateResult",
  "KVCache",
  "TracePrediction",
  "cache_layout",
  "generate",
  "init_cache",
  "is_held_out",
  "predict_trace",
  "side_by_side",
]
