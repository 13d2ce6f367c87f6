"""MFU of a CWM-shaped preset (default `cwm_1b`; `cwm_8b` for the 8B class) at 8k context
with cuDNN attention, on one GPU.

  python benchmarks/gpu_mfu.py [--config cwm_1b] [--param_dtype float32] [--seq 8192]
      [--batch 1] [--docs 1] [--steps 10]
      [--impl cudnn] [--remat none] [--loss_chunk 0] [--max_segments 0] [--measure_matmul 1]
      [--profile_steps 0] [--save]

Runs `cwm_jax.train.step` (forward + backward + AdamW, bfloat16 compute,
`--param_dtype` params and optimizer state) on rows of `--docs` packed documents (positions restart per
document) and reports model FLOPs utilisation: useful FLOPs from
`cwm_jax.train.flops.batch_flops` (6 x matmul params per real token plus
12*N*H per (query, key) pair at each layer's real window, per document,
padding excluded) over the median step time and the device's peak dense bf16
FLOP/s (`flops.peak_flops`), and over the bf16 matmul rate measured in the same
process (a chain of 8192^3 products on random data, `matmul_rate`). Step time is
the median of `--steps` steps, each timed to completion. Without a GPU it prints
a JSON object saying so and exits 0. `--profile_steps N` adds GPU kernel time per step by
category (cuDNN attention, matmuls, reductions, the rest) and the top kernels, from a JAX
profiler trace. Prints one JSON object; `--save` also writes it under
benchmarks/results/gpu_mfu/ (`results_io`; not a run skipped for want of a GPU).
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.kernels.cudnn import check_gpu_dtypes
from cwm_jax.model.config import preset
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import init_model
from cwm_jax.train.flops import batch_flops, peak_flops
from cwm_jax.train.step import make_train_step


def packed_batch(vocab: int, batch: int, seq: int, docs: int, seed: int = 0) -> dict:
  """Rows of `docs` random-length documents, ids 1..docs, positions per document."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  segments = np.empty((batch, seq), np.int32)
  positions = np.empty((batch, seq), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False)) if docs > 1 else []
    lengths = np.diff(np.r_[0, cuts, seq]).astype(int)
    segments[row] = np.repeat(np.arange(1, docs + 1), lengths)
    positions[row] = np.concatenate([np.arange(n) for n in lengths])
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": positions,
    "segment_ids": segments,
    "weights": np.ones((batch, seq), np.float32),
  }


def matmul_rate(n: int = 8192, chain: int = 20, rounds: int = 5) -> float:
  """bf16 FLOP/s of XLA's n^3 matmul on this device: `chain` dependent products of
  random matrices in one program (c <- c @ b / sqrt(n), so no product can be hoisted),
  median of `rounds` timed runs after a warm-up."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))

  @jax.jit
  def run(c, b):
    return jax.lax.fori_loop(0, chain, lambda _, c: (c @ b) * jnp.bfloat16(n**-0.5), c)

  run(a, b).block_until_ready()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    run(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 * chain / statistics.median(times)


KERNEL_KINDS = (  # (category, pattern on the kernel name), first match wins
  ("attention", re.compile(r"cudnn|fmha|flash|fprop|dgrad|sdpa", re.I)),
  ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|matmul|dot", re.I)),
  ("reduction", re.compile(r"reduce|reduction", re.I)),
)


def kernel_profile(run_steps, n_steps: int, step_s: float, top: int = 30) -> dict:
  """GPU kernel time per step by category and by kernel, from a JAX profiler trace of
  `run_steps()` (which runs `n_steps` steps and blocks). `busy_fraction` is kernel time
  over the measured step time `step_s`: what launch gaps and host waits leave. Each top
  kernel comes with the XLA instruction that launched it (`hlo_op`), where recorded."""
  trace_dir = tempfile.mkdtemp(prefix="gpu_mfu_trace")
  with jax.profiler.trace(trace_dir):
    run_steps()
  [path] = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  total, by_kind, by_kernel = 0.0, collections.Counter(), collections.Counter()
  ops = collections.defaultdict(collections.Counter)
  planes = list(jax.profiler.ProfileData.from_file(path).planes)
  for plane in planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        ms = event.duration_ns / 1e6 / n_steps
        kind = next((k for k, rx in KERNEL_KINDS if rx.search(event.name)), "elementwise/other")
        total += ms
        by_kind[kind] += ms
        by_kernel[event.name[:90]] += ms
        op = dict(event.stats).get("hlo_op")
        if op:
          ops[event.name[:90]][str(op)] += ms
  seen = lambda: sorted({f"{plane.name}: {line.name}" for plane in planes for line in plane.lines})[
    :20
  ]
  return {
    "kernel_ms_per_step": round(total, 2),
    **({} if total else {"no_gpu_kernels_in": seen()}),
    "busy_fraction": round(total / 1e3 / step_s, 3),
    "by_category_ms": {k: round(v, 2) for k, v in by_kind.most_common()},
    "top_kernels_ms": [
      [name, round(v, 2), [o for o, _ in ops[name].most_common(3)]]
      for name, v in by_kernel.most_common(top)
    ],
  }


def measure(a) -> dict:
  cfg = preset(a.config)
  run = Execution(
    param_dtype=a.param_dtype,
    compute_dtype="bfloat16",
    attention_impl=a.impl,
    remat_policy=a.remat,
    attention_max_segments=a.max_segments,
  )
  if a.impl == "cudnn":
    check_gpu_dtypes(run.compute_dtype)
  tx = optax.adamw(1e-4, weight_decay=0.1)

  @jax.jit
  def init():
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0, run), nnx.Param))
    return {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jnp.zeros((2,), jnp.uint32),
    }

  state = init()
  host = packed_batch(cfg.vocab_size, a.batch, a.seq, a.docs)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  step = jax.jit(
    make_train_step(cfg, tx, lambda s: 1e-4, loss_chunk=a.loss_chunk, execution=run),
    donate_argnums=0,
  )
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics["loss"])
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(a.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  profile = None
  if a.profile_steps:

    def run_steps():
      nonlocal state, metrics
      for _ in range(a.profile_steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics["loss"])

    profile = kernel_profile(run_steps, a.profile_steps, step_s)
  dev = jax.devices()[0]
  flops = batch_flops(cfg, host["positions"], host["segment_ids"])
  peak = peak_flops(dev.device_kind)
  stats = dev.memory_stats() or {}
  rate = matmul_rate() if a.measure_matmul else None
  return {
    "mfu": round(flops / step_s / peak, 4) if peak else None,
    "step_s": round(step_s, 4),
    "step_s_min_max": [round(min(times), 4), round(max(times), 4)],
    "matmul_tflop_per_s": round(rate / 1e12, 1) if rate else None,
    "fraction_of_matmul_rate": round(flops / step_s / rate, 4) if rate else None,
    "first_step_s": round(compile_s, 1),
    "tokens_per_s": round(a.batch * a.seq / step_s, 1),
    "model_flops_per_step": flops,
    "device": dev.device_kind,
    "peak_flops": peak,
    "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
    "config": a.config,
    "param_dtype": a.param_dtype,
    "params": cfg.param_count(),
    "seq": a.seq,
    "batch": a.batch,
    "docs_per_row": a.docs,
    "attention_impl": a.impl,
    "remat": a.remat,
    "max_segments": a.max_segments,
    "loss_chunk": a.loss_chunk,
    "loss": float(metrics["loss"]),
    "profile": profile,
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="cwm_1b", help="model preset (cwm_1b, cwm_8b, ...)")
  p.add_argument(
    "--param_dtype",
    default="float32",
    help="params and AdamW state (bfloat16 lets an 8B model train on one 80 GB GPU)",
  )
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--docs", type=int, default=1, help="documents packed per row")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--impl", default="cudnn")
  p.add_argument("--remat", default="none")
  p.add_argument("--loss_chunk", type=int, default=0)
  p.add_argument(
    "--max_segments",
    type=int,
    default=0,
    help="documents per row of cuDNN's packed layout (0: its default)",
  )
  p.add_argument(
    "--profile_steps",
    type=int,
    default=0,
    help="N > 0: trace N more steps and report GPU kernel time by category",
  )
  p.add_argument(
    "--measure_matmul",
    type=int,
    default=1,
    help="1: also measure the bf16 8192^3 matmul rate in this process",
  )
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  a = p.parse_args()
  if not 1 <= a.docs <= a.seq:
    p.error(f"--docs={a.docs} must be in [1, --seq]")
  if jax.default_backend() != "gpu":
    print(
      json.dumps(
        {
          "mfu": None,
          "skipped": f"needs an NVIDIA GPU; backend is {jax.default_backend()!r}",
          "config": a.config,
          "seq": a.seq,
        }
      )
    )
    return
  result = measure(a)
  print(json.dumps(result))
  if a.save:
    print("saved", results_io.save("gpu_mfu", result), file=sys.stderr)


if __name__ == "__main__":
  main()
