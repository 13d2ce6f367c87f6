"""Conversion throughput and peak host memory on a synthetic checkpoint (>= 2 GB).

  python benchmarks/convert.py [--dim 2048 --n_layers 12 --vocab 32000 --to orbax,hf,meta] [--save]

Writes a random Hugging Face checkpoint of a mid-size CWM-shaped config into a
temporary directory, then runs each conversion (hf -> orbax, orbax -> hf,
optionally orbax -> meta) in a fresh subprocess and reports GB/s and the peak
RSS of that process, also relative to the largest tensor. Prints one JSON object; `--save`
also writes it under benchmarks/results/convert/ (`results_io`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.checkpoint import hf
from cwm_jax.checkpoint.names import HF, locate
from cwm_jax.model.config import ModelConfig, meta_layer_windows

CHILD = """
import json, resource, sys, psutil
from cwm_jax.checkpoint.conversion import convert
base = psutil.Process().memory_info().rss
out = convert(sys.argv[1], sys.argv[2], sys.argv[3])
out["baseline_rss_bytes"] = base
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def synthetic_hf(directory: str, cfg: ModelConfig) -> dict[str, int]:
  """Random float32 HF checkpoint for `cfg`; returns {name: nbytes}."""
  os.makedirs(directory)
  where = locate(HF, cfg)
  specs = [(n, e.shape(cfg), np.dtype("float32")) for n, (e, _) in where.items()]
  rng = np.random.default_rng(0)
  hf.write_safetensors(
    directory, specs, lambda n: rng.random(where[n][0].shape(cfg), dtype=np.float32) - 0.5
  )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf.config_to_hf(cfg, dtype="float32"), f)
  return {n: math.prod(s) * 4 for n, s, _ in specs}


def run(src: str, dst: str, to: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(
    [sys.executable, "-c", CHILD, src, dst, to],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--n_layers", type=int, default=12)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--to", default="orbax,hf")
  p.add_argument("--workdir", default=None, help="where the temporary checkpoints go")
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  args = p.parse_args()
  n_heads = args.dim // 128
  cfg = ModelConfig(
    vocab_size=args.vocab,
    dim=args.dim,
    n_layers=args.n_layers,
    n_heads=n_heads,
    n_kv_heads=max(1, n_heads // 4),
    head_dim=128,
    ffn_dim=int(args.dim * 2.75),
    global_window=131072,
    layer_windows=meta_layer_windows(args.n_layers, 8192, 131072),
  )
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    start = time.perf_counter()
    sizes = synthetic_hf(os.path.join(tmp, "source_hf"), cfg)
    made = time.perf_counter() - start
    largest = max(sizes.values())
    largest_stacked = max(sum(sizes[n] for n in e.names(cfg)) for e in HF)
    result = {
      "config": {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "vocab": cfg.vocab_size,
        "ffn_dim": cfg.ffn_dim,
        "dtype": "float32",
      },
      "checkpoint_gb": round(sum(sizes.values()) / 1e9, 3),
      "largest_tensor_gb": round(largest / 1e9, 3),
      "largest_stacked_leaf_gb": round(largest_stacked / 1e9, 3),
      "write_synthetic_s": round(made, 1),
      "conversions": {},
    }
    src_for = {"orbax": "source_hf", "hf": "orbax", "meta": "orbax"}
    for to in args.to.split(","):
      out = run(os.path.join(tmp, src_for[to]), os.path.join(tmp, to), to)
      peak, base = out["peak_rss_bytes"], out["baseline_rss_bytes"]
      result["conversions"][f"{src_for[to].replace('source_', '')}->{to}"] = {
        "gb_per_s": out["gb_per_s"],
        "seconds": out["seconds"],
        "peak_rss_gb": round(peak / 1e9, 3),
        "baseline_rss_gb": round(base / 1e9, 3),
        "peak_rss_over_largest_tensor": round(peak / largest, 2),
        "peak_minus_baseline_over_largest_tensor": round((peak - base) / largest, 2),
      }
  print(json.dumps(result))
  if args.save:
    print("saved", results_io.save("convert", result), file=sys.stderr)


if __name__ == "__main__":
  main()
