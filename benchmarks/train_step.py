"""Train-step tokens/s: our jitted step vs transformers' CwmForCausalLM (torch).

  python benchmarks/train_step.py [--batch 8] [--seq 256] [--steps 20] [--threads 2]
      [--impl reference] [--preset tiny]

Both sides run forward + backward + AdamW (lr 1e-3, wd 0.1, no clipping) on the
same config, batch and thread count, in float32, alternating timed rounds so
a shared machine's load hits both alike. Ours is `cwm_jax.train.step` (the
training engineer's step) jitted with the state donated. `ratio` = ours /
transformers tokens/s (median over rounds). Prints one JSON object.
"""

import argparse
import json
import os
import statistics
import time


def _args():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
  p.add_argument("--impl", default="reference", help="attention_impl for our model")
  p.add_argument("--preset", default="tiny")
  return p.parse_args()


def _ours(cfg, run, batch_np, lr):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from cwm_jax.model import init_model
  from cwm_jax.train.step import make_train_step

  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0, run), nnx.Param))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jnp.zeros((2,), jnp.uint32)}
  step = jax.jit(make_train_step(cfg, tx, lambda s: lr, execution=run), donate_argnums=0)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  holder = {"state": state}

  def run(n):
    for _ in range(n):
      holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
    return float(metrics["loss"])
  return run


def _theirs(cfg, batch_np, lr, threads):
  import torch
  import transformers
  from cwm_jax.checkpoint.hf import config_to_hf

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf = config_to_hf(cfg, dtype="float32")
  model = transformers.CwmForCausalLM(transformers.CwmConfig(**hf)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.1)
  inputs = torch.as_tensor(batch_np["inputs"]).long()
  targets = torch.as_tensor(batch_np["targets"]).long()

  def run(n):
    for _ in range(n):
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    return float(loss)
  return run


def _rate(run, steps, tokens):
  start = time.perf_counter()
  run(steps)
  return steps * tokens / (time.perf_counter() - start)


def main():
  a = _args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                        f"intra_op_parallelism_threads={a.threads}")
  import numpy as np
  from cwm_jax.model import Execution, preset

  cfg, run = preset(a.preset), Execution(attention_impl=a.impl)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (a.batch, a.seq + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq)).copy(),
           "segment_ids": np.ones((a.batch, a.seq), np.int32),
           "weights": np.ones((a.batch, a.seq), np.float32)}
  ours, theirs = _ours(cfg, run, batch, 1e-3), _theirs(cfg, batch, 1e-3, a.threads)
  start = time.perf_counter()
  ours(1)
  compile_s = time.perf_counter() - start
  theirs(2)
  ours(2)
  n_tok = a.batch * a.seq
  r_ours, r_theirs = [], []
  for _ in range(a.rounds):
    r_ours.append(_rate(ours, a.steps, n_tok))
    r_theirs.append(_rate(theirs, a.steps, n_tok))
  med_ours, med_theirs = statistics.median(r_ours), statistics.median(r_theirs)
  print(json.dumps({
      "ratio": round(med_ours / med_theirs, 3),
      "ours_tokens_per_s": round(med_ours, 1), "transformers_tokens_per_s": round(med_theirs, 1),
      "ours_rounds": [round(r, 1) for r in r_ours],
      "transformers_rounds": [round(r, 1) for r in r_theirs],
      "ours_compile_s": round(compile_s, 2), "preset": a.preset, "attention_impl": a.impl,
      "batch": a.batch, "seq": a.seq, "threads": a.threads, "params": cfg.param_count(),
  }))


if __name__ == "__main__":
  main()
