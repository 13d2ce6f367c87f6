"""Compiled temporary memory of a train step vs sequence length.

  python benchmarks/attention_memory.py [--seqs 4096,8192,16384,32768,65536]

Compiles (nothing runs) `cwm_jax.train.step` (forward + backward + AdamW)
for a small CWM-shaped model, one global and one local layer (window 1024),
batch 1, for each T, and reads `memory_analysis().temp_size_in_bytes`.
`growth_exponent` is the least-squares slope of log(temp) on log(T) for the
chunked backend (1.0 = linear); the dense reference is shown for contrast
on the shorter lengths. Prints one JSON object.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cwm_jax.model import Execution, tiny
from cwm_jax.train.state import abstract_state
from cwm_jax.train.step import make_train_step


def temp_bytes(cfg, run, t: int) -> int:
  tx = optax.adamw(1e-3, weight_decay=0.1)
  state = abstract_state(cfg, tx, execution=run)
  batch = {
    k: jax.ShapeDtypeStruct((1, t), jnp.float32 if k == "weights" else jnp.int32)
    for k in ("inputs", "targets", "positions", "segment_ids", "weights")
  }
  step = jax.jit(make_train_step(cfg, tx, lambda s: 1e-3, execution=run), donate_argnums=0)
  return int(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def slope(ts, ys):
  return float(np.polyfit(np.log(ts), np.log(ys), 1)[0])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seqs", default="4096,8192,16384,32768,65536")
  p.add_argument("--dense_seqs", default="4096,8192,16384")
  a = p.parse_args()
  seqs = [int(s) for s in a.seqs.split(",")]
  dense_seqs = [int(s) for s in a.dense_seqs.split(",")]
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
  chunked = [
    temp_bytes(tiny(**base), Execution(attention_impl="chunked", attention_chunk=512), t)
    for t in seqs
  ]
  dense = [temp_bytes(tiny(**base), Execution(attention_impl="reference"), t) for t in dense_seqs]
  print(
    json.dumps(
      {
        "growth_exponent": round(slope(seqs, chunked), 3),
        "dense_growth_exponent": round(slope(dense_seqs, dense), 3),
        "chunked_temp_bytes": dict(zip(map(str, seqs), chunked)),
        "dense_temp_bytes": dict(zip(map(str, dense_seqs), dense)),
        "model": "2 layers (global + local W=1024), D=128, N=4, K=2, H=32, chunk 512, batch 1",
      }
    )
  )


if __name__ == "__main__":
  main()
