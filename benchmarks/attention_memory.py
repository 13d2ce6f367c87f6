"""Compiled temporary memory of a train step vs sequence length, checked for jumps.

  python benchmarks/attention_memory.py [--seqs 1024,2048,4096,8192,16384,32768,65536] [--save]

Compiles (nothing runs) `cwm_jax.train.step` (forward + backward + AdamW)
for a small CWM-shaped model, one global and one local layer (window 1024),
batch 1, for each T, and reads `memory_analysis().temp_size_in_bytes`.
`chunked_temp_bytes_per_token` is that figure over T at each length: with
attention linear in T it stays flat or falls. The run fails (exit 1, the
offending lengths named on stderr) when the chunked step's temporaries are not
monotone in T, or when its bytes per token rise by more than `JUMP_FACTOR`
from one length to the next (as a switch of the kernel's schedule at some
length would show). `growth_exponent` is the least-squares slope of log(temp)
on log(T) for the chunked backend (1.0 = linear); the dense reference is shown
for contrast on the shorter lengths. Prints one JSON object; `--save` also
writes it under benchmarks/results/attention_memory/ (`results_io`).
"""

import argparse
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cwm_jax.model import Execution, tiny
from cwm_jax.train.state import abstract_state
from cwm_jax.train.step import make_train_step

# Most that the chunked step's temporaries per token may grow from one length to the next.
JUMP_FACTOR = 1.25


def temp_bytes(cfg, execution, t: int) -> int:
  tx = optax.adamw(1e-3, weight_decay=0.1)
  state = abstract_state(cfg, tx, execution=execution)
  batch = {
    k: jax.ShapeDtypeStruct((1, t), jnp.float32 if k == "weights" else jnp.int32)
    for k in ("inputs", "targets", "positions", "segment_ids", "weights")
  }
  step = jax.jit(make_train_step(cfg, tx, lambda s: 1e-3, execution=execution), donate_argnums=0)
  return int(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def slope(ts, ys):
  return float(np.polyfit(np.log(ts), np.log(ys), 1)[0])


def jumps(temp_by_t: dict[int, int], factor: float = JUMP_FACTOR) -> list[str]:
  """One line per pair of consecutive lengths whose temporaries fall as T grows, or whose
  bytes per token grow by more than `factor`."""
  ts = sorted(temp_by_t)
  out = []
  for lo, hi in zip(ts, ts[1:]):
    a, b = temp_by_t[lo], temp_by_t[hi]
    if b < a:
      out.append(f"T={lo} -> {hi}: temporaries fall from {a:,} to {b:,} bytes")
    grow = (b / hi) / (a / lo)
    if grow > factor:
      out.append(f"T={lo} -> {hi}: bytes per token grow {grow:.2f}x (> {factor}x)")
  return out


def _results_io():
  """benchmarks/results_io.py by path (as tables.py loads it): benchmarks/ on sys.path
  would shadow modules such as `tables` for whatever imports after."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_io.py")
  spec = importlib.util.spec_from_file_location("results_io", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768,65536")
  p.add_argument("--dense_seqs", default="4096,8192,16384")
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  a = p.parse_args()
  seqs = sorted(int(s) for s in a.seqs.split(","))
  dense_seqs = [int(s) for s in a.dense_seqs.split(",") if s]
  base = dict(
    n_layers=2,
    layer_windows=(131072, 1024),
    global_window=131072,
    max_seq_len=131072,
    dim=128,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    ffn_dim=256,
  )
  chunked = {
    t: temp_bytes(tiny(**base), Execution(attention_impl="chunked", attention_chunk=512), t)
    for t in seqs
  }
  dense = [temp_bytes(tiny(**base), Execution(attention_impl="reference"), t) for t in dense_seqs]
  bad = jumps(chunked)
  result = {
    "growth_exponent": round(slope(seqs, list(chunked.values())), 3),
    "dense_growth_exponent": round(slope(dense_seqs, dense), 3) if len(dense) > 1 else None,
    "chunked_temp_bytes": {str(t): b for t, b in chunked.items()},
    "chunked_temp_bytes_per_token": {str(t): round(b / t) for t, b in chunked.items()},
    "dense_temp_bytes": dict(zip(map(str, dense_seqs), dense)),
    "jump_factor": JUMP_FACTOR,
    "jumps": bad,
    "model": "2 layers (global + local W=1024), D=128, N=4, K=2, H=32, chunk 512, batch 1",
  }
  print(json.dumps(result))
  if a.save:
    print("saved", _results_io().save("attention_memory", result), file=sys.stderr)
  for line in bad:
    print(f"attention_memory: {line}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
