"""Bytes moved by collectives per attention layer under context parallelism.

  python benchmarks/context_parallel.py [--seq 131072] [--window 8192] [--devices 8] [--save]

Compiles (nothing runs) one attention layer of the CWM 32B head shape
(48 query heads, 8 kv heads, head dim 128, float32, batch 1) sharded along
the `sequence` axis of `--devices` simulated CPU devices, forward and
forward+backward, for a local layer (halo exchange) and a global layer
('allgather' and 'ring'). Bytes received per device are read from the
compiled HLO: collective-permute = its result, all-gather = (n-1)/n of its
result, reduce-scatter = (n-1) x its result, all-reduce = 2(n-1)/n x its
result. The halo lower bound is (W-1) rows of K and V plus their segment
ids (forward), and the K/V part again for dK/dV (backward). Prints one JSON; `--save` also
writes it under benchmarks/results/context_parallel/ (`results_io`).
"""

import argparse
import os
import re
import sys

_p = argparse.ArgumentParser()
_p.add_argument("--seq", type=int, default=131072)
_p.add_argument("--window", type=int, default=8192)
_p.add_argument("--devices", type=int, default=8)
_p.add_argument("--chunk", type=int, default=512)
_p.add_argument(
  "--dtype",
  default="float32",
  help="XLA:CPU widens bfloat16 collectives to float32 in the compiled HLO, "
  "so float32 is the faithful setting on CPU",
)
_p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
ARGS = _p.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.kernels.context_parallel import sharded_attention  # noqa: E402

N, K, H = 48, 8, 128
DTYPE = jnp.dtype(ARGS.dtype)
OPS = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_LINE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(OPS) + r")(-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}


def collective_bytes(hlo: str, n: int) -> dict:
  """Bytes received per device, by collective kind, from compiled HLO text."""
  out = {}
  for line in hlo.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):  # async start: (operand, result[, ...]); keep the result
      shapes = shapes[1:2]
    size = sum(
      _BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x])) for d, dims in shapes
    )
    factor = {
      "collective-permute": 1.0,
      "all-gather": (n - 1) / n,
      "reduce-scatter": n - 1.0,
      "all-reduce": 2 * (n - 1) / n,
      "all-to-all": (n - 1) / n,
    }[m.group(2)]
    out[m.group(2)] = out.get(m.group(2), 0.0) + size * factor
  return out


def layer_bytes(mesh, t, window, mode, train):
  spec_q = P(None, "sequence", None, None)
  shard = lambda spec: NamedSharding(mesh, spec)
  q = jax.ShapeDtypeStruct((1, t, N, H), DTYPE, sharding=shard(spec_q))
  kv = jax.ShapeDtypeStruct((1, t, K, H), DTYPE, sharding=shard(spec_q))
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=shard(P(None, "sequence")))

  def attn(q, k, v, s):
    return sharded_attention(
      q,
      k,
      v,
      s,
      window=window,
      chunk=ARGS.chunk,
      mode=mode,
      q_spec=spec_q,
      kv_spec=spec_q,
      seg_spec=P(None, "sequence"),
    )

  fn = attn
  if train:
    fn = jax.grad(lambda q, k, v, s: attn(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  with jax.set_mesh(mesh):
    hlo = jax.jit(fn).lower(q, kv, kv, seg).compile().as_text()
  return collective_bytes(hlo, mesh.shape["sequence"])


def main():
  n, t, w = ARGS.devices, ARGS.seq, ARGS.window
  mesh = jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
  row = 2 * K * H * jnp.dtype(DTYPE).itemsize
  bound_fwd = (w - 1) * (row + 4)
  bound_train = (w - 1) * (2 * row + 4)
  result = {}
  for name, window, mode in (
    ("local", w, "allgather"),
    ("global_allgather", t, "allgather"),
    ("global_ring", t, "ring"),
  ):
    for train in (False, True):
      got = layer_bytes(mesh, t, window, mode, train)
      result[f"{name}_{'fwd_bwd' if train else 'fwd'}_bytes"] = {k: int(v) for k, v in got.items()}
  total = lambda d: sum(d.values())
  out = {
    "local_over_halo_bound": round(total(result["local_fwd_bytes"]) / bound_fwd, 4),
    "local_fwd_bwd_over_halo_bound": round(total(result["local_fwd_bwd_bytes"]) / bound_train, 4),
    "halo_bound_fwd_bytes": bound_fwd,
    "halo_bound_fwd_bwd_bytes": bound_train,
    "global_gather_lower_bound_fwd_bytes": (n - 1) * (t // n) * (row + 4),
    **result,
    "seq": t,
    "window": w,
    "devices": n,
    "heads": [N, K, H],
    "dtype": ARGS.dtype,
  }
  print(json.dumps(out))
  if ARGS.save:
    print("saved", results_io.save("context_parallel", out), file=sys.stderr)


if __name__ == "__main__":
  main()
