"""Compiled FLOPs of one local attention layer vs the ideal windowed count.

  python benchmarks/attention_flops.py [--seq 32768] [--window 8192] [--chunk 512] [--save]

XLA cost analysis (compile only, nothing allocated) of the forward attention
of one layer with the CWM 32B head shape (48 query heads, 8 kv heads, head
dim 128), batch 1. Ideal = 4*N*H FLOPs (QK^T and PV) per (query, key) pair
inside the causal window. XLA counts a loop body once, so the chunked
kernel's total is `cost(scan) + (pairs - 1) * body`, where `body` is the
difference between one and two unrolled pair steps. Prints one JSON object; `--save` also
writes it under benchmarks/results/attention_flops/ (`results_io`).
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.kernels.chunked import block_pairs, flash_attention
from cwm_jax.kernels.reference import reference_attention
from cwm_jax.train.flops import causal_pairs

N, K, H = 48, 8, 128


def _flops(fn, t):
  q = jax.ShapeDtypeStruct((1, t, N, H), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, K, H), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  return float(jax.jit(fn).lower(q, kv, kv, seg).compile().cost_analysis()["flops"])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, default=32768)
  p.add_argument("--window", type=int, default=8192)
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  a = p.parse_args()
  t, w, c = a.seq, a.window, a.chunk
  idx = np.arange(t)
  pairs = block_pairs(t // c, t // c, c, w)

  def chunked(pair_list, unroll):
    return lambda q, k, v, s: flash_attention(
      q, k, v, s, s, idx, idx, window=w, chunk=c, pairs=pair_list, unroll=unroll
    )[0]

  scanned = _flops(chunked(pairs, False), t)
  one, two = _flops(chunked(pairs[:1], True), t), _flops(chunked(pairs[:2], True), t)
  body = two - one
  chunked_total = scanned + (len(pairs) - 1) * body
  dense = _flops(lambda q, k, v, s: reference_attention(q, k, v, s, s, window=w), t)
  ideal = 4.0 * N * H * causal_pairs(t, w)
  result = {
    "chunked_over_ideal": round(chunked_total / ideal, 4),
    "dense_over_ideal": round(dense / ideal, 4),
    "chunked_flops": chunked_total,
    "dense_flops": dense,
    "ideal_flops": ideal,
    "block_pairs": len(pairs),
    "pair_body_flops": body,
    "block_pairs_over_ideal": round(len(pairs) * c * c / causal_pairs(t, w), 4),
    "seq": t,
    "window": w,
    "chunk": c,
    "heads": [N, K, H],
  }
  print(json.dumps(result))
  if a.save:
    print("saved", results_io.save("attention_flops", result), file=sys.stderr)


if __name__ == "__main__":
  main()
