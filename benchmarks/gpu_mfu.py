"""MFU of the ~1B config (`cwm_1b`) at 8k context with cuDNN attention, on one GPU.

  python benchmarks/gpu_mfu.py [--seq 8192] [--batch 1] [--steps 10] [--impl cudnn]

Runs `cwm_jax.train.step` (forward + backward + AdamW, bfloat16 compute,
float32 params, no remat) and reports model FLOPs utilisation: useful FLOPs
from `cwm_jax.train.flops.batch_flops` (6 x params per token plus attention
at each layer's real window, padding excluded) over step time and the
device's peak bf16 FLOP/s. Without a GPU it prints a JSON object saying so
and exits 0. Prints one JSON object.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cwm_jax.model import init_model
from cwm_jax.model.config import cwm_1b
from cwm_jax.train.flops import batch_flops, peak_flops
from cwm_jax.train.step import make_train_step


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--impl", default="cudnn")
  p.add_argument("--remat", default="none")
  a = p.parse_args()
  if jax.default_backend() != "gpu":
    print(json.dumps({"mfu": None, "skipped": f"needs an NVIDIA GPU; backend is "
                      f"{jax.default_backend()!r}", "config": "cwm_1b", "seq": a.seq}))
    return
  cfg = cwm_1b(attention_impl=a.impl, remat_policy=a.remat)
  tx = optax.adamw(1e-4, weight_decay=0.1)
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0), nnx.Param))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jnp.zeros((2,), jnp.uint32)}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (a.batch, a.seq + 1)).astype(np.int32)
  positions = np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq))
  segments = np.ones((a.batch, a.seq), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
           "segment_ids": segments, "weights": np.ones((a.batch, a.seq), np.float32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  step = jax.jit(make_train_step(cfg, tx, lambda s: 1e-4), donate_argnums=0)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics["loss"])
  start = time.perf_counter()
  for _ in range(a.steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics["loss"])
  step_s = (time.perf_counter() - start) / a.steps
  kind = jax.devices()[0].device_kind
  flops = batch_flops(cfg, positions, segments)
  print(json.dumps({
      "mfu": round(flops / step_s / peak_flops(kind), 4), "step_s": round(step_s, 4),
      "tokens_per_s": round(a.batch * a.seq / step_s, 1), "model_flops_per_step": flops,
      "device": kind, "peak_flops": peak_flops(kind), "config": "cwm_1b",
      "params": cfg.param_count(), "seq": a.seq, "batch": a.batch, "attention_impl": a.impl,
      "remat": a.remat, "loss": float(metrics["loss"]),
  }))


if __name__ == "__main__":
  main()
