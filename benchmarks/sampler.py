"""KV-cache sampler: decode throughput of a small model and cache memory of CWM 32B.

  python benchmarks/sampler.py   # prints one JSON object
"""

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
  shapes = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
  model = model_from_params(cfg, jax.tree.map(
      lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes))
  prompts = [rng.randint(0, 4352, prompt).tolist() for _ in range(batch)]
  t0 = time.perf_counter()
  sampler.generate(model, prompts, max_new_tokens=new)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  sampler.generate(model, prompts, max_new_tokens=new)
  run = time.perf_counter() - t0
  return {"model_params": cfg.param_count(), "batch": batch, "prompt": prompt, "new": new,
          "compile_plus_run_s": round(first, 2), "run_s": round(run, 3),
          "tokens_per_s": round(batch * new / run, 1)}


def main():
  big = cwm_32b()
  full = big.replace(layer_windows=(big.global_window,) * big.n_layers)
  out = {"device": jax.devices()[0].device_kind,
         "cwm32b_cache_gib_bf16_b1_131072": round(cache_gib(big, 1, 131072), 2),
         "cwm32b_cache_gib_without_ring_buffers": round(cache_gib(full, 1, 131072), 2),
         "decode": decode_speed()}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
