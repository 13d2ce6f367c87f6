"""KV-cache sampler: decode throughput of a small model, cache memory of CWM 32B, and the
sampler's compile time per depth.

  python benchmarks/sampler.py                          # prints one JSON object
  python benchmarks/sampler.py --compile_layers 16,64   # adds compile seconds per depth
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cwm_jax.infer import cache as kv
from cwm_jax.infer import sampler
from cwm_jax.model import abstract_model, cwm_32b, model_from_params, tiny


def cache_gib(cfg, batch, cache_len):
  c = jax.eval_shape(lambda: kv.init_cache(cfg, jnp.zeros((batch,), jnp.int32), cache_len,
                                           jnp.bfloat16))
  return sum(np.prod(x.shape) * 2 for x in c.k + c.v) / 2**30


def decode_speed(batch=4, prompt=64, new=64):
  cfg = tiny(vocab_size=4352, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
             ffn_dim=768, local_window=32, global_window=1024)
  rng = np.random.RandomState(0)
  model = _random_model(cfg)
  prompts = [rng.randint(0, 4352, prompt).tolist() for _ in range(batch)]
  first, run = _first_and_second(lambda: sampler.generate(model, prompts, max_new_tokens=new))
  return {"model_params": cfg.param_count(), "batch": batch, "prompt": prompt, "new": new,
          "compile_plus_run_s": round(first, 2), "run_s": round(run, 3),
          "tokens_per_s": round(batch * new / run, 1)}


def _first_and_second(call) -> tuple[float, float]:
  """Seconds of a first call (trace + compile + run) and of a second (run only)."""
  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times[0], times[1]


def _random_model(cfg, seed=0):
  rng = np.random.RandomState(seed)
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  return model_from_params(cfg, jax.tree.map(
      lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes))


def compile_seconds(n_layers, new=8):
  """First `generate` call (trace + compile + run) minus a second call (run only), for a
  tiny-width model of `n_layers` layers (Meta's pattern: every 4th and the last global)."""
  cfg = tiny(n_layers=n_layers)
  model = _random_model(cfg)
  prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
  first, run = _first_and_second(lambda: sampler.generate(model, prompts, max_new_tokens=new))
  return {"n_layers": n_layers, "new": new, "first_call_s": round(first, 2),
          "run_s": round(run, 3), "compile_s": round(first - run, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compile_layers", default="",
                      help="comma-separated depths, e.g. 16,64: report compile seconds per depth")
  parser.add_argument("--skip_decode", action="store_true",
                      help="skip the decode-throughput and cache-memory figures")
  args = parser.parse_args()
  out = {"device": jax.devices()[0].device_kind}
  if not args.skip_decode:
    big = cwm_32b()
    full = big.replace(layer_windows=(big.global_window,) * big.n_layers)
    out.update({"cwm32b_cache_gib_bf16_b1_131072": round(cache_gib(big, 1, 131072), 2),
                "cwm32b_cache_gib_without_ring_buffers": round(cache_gib(full, 1, 131072), 2),
                "decode": decode_speed()})
  if args.compile_layers:
    depths = [int(n) for n in args.compile_layers.split(",")]
    compile_seconds(1)   # warm-up: the process's first jit also pays one-off backend setup
    out["compile"] = [compile_seconds(n) for n in depths]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
