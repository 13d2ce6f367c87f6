"""Time to compile the CWM 32B train step and forward for a simulated mesh.

  python benchmarks/compile_time.py [--devices 64] [--fsdp 16] [--tensor 4] [--seq 8192] [--save]

AOT only (nothing allocated): `cwm_jax.train.step` (forward + backward +
AdamW, remat 'full', chunked attention, bfloat16 compute) jitted with the
parameter shardings of `cwm_jax.parallel.sharding.DEFAULT_RULES` on a mesh
of simulated CPU devices, batch = data*fsdp rows; then the 32B forward with
the layers scanned vs unrolled. Prints one JSON object; `--save` also writes it under
benchmarks/results/compile_time/ (`results_io`).
"""

import argparse
import os
import sys

_p = argparse.ArgumentParser()
_p.add_argument("--devices", type=int, default=64)
_p.add_argument("--fsdp", type=int, default=16)
_p.add_argument("--tensor", type=int, default=4)
_p.add_argument("--seq", type=int, default=8192)
_p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
ARGS = _p.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.model import Execution, cwm_32b  # noqa: E402
from cwm_jax.model.transformer import abstract_model  # noqa: E402
from cwm_jax.parallel.mesh import make_mesh  # noqa: E402
from cwm_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402
from cwm_jax.train.state import abstract_state, state_shardings, with_shardings  # noqa: E402
from cwm_jax.train.step import BATCH_KEYS, jit_train_step, make_train_step  # noqa: E402

# The execution of configs/cwm_32b.py's step.
RUN = Execution(
  compute_dtype="bfloat16", attention_impl="chunked", attention_chunk=1024, remat_policy="full"
)


def _timed(lowered_fn):
  start = time.perf_counter()
  lowered = lowered_fn()
  mid = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  return round(mid - start, 2), round(end - mid, 2), compiled


def train_step(cfg, mesh, batch_rows):
  tx = optax.adamw(1e-4, weight_decay=0.1)
  shardings = state_shardings(cfg, tx, DEFAULT_RULES, mesh)
  state = with_shardings(abstract_state(cfg, tx, execution=RUN), shardings)
  batch_sh = NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
  batch = {
    k: jax.ShapeDtypeStruct(
      (batch_rows, ARGS.seq), jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sh
    )
    for k in BATCH_KEYS
  }
  step = jit_train_step(
    make_train_step(cfg, tx, lambda s: 1e-4, rules=DEFAULT_RULES, execution=RUN),
    shardings,
    batch_sh,
  )
  with jax.set_mesh(mesh):
    return _timed(lambda: step.lower(state, batch))


def forward(cfg, mesh, batch_rows, run):
  graphdef, params = nnx.split(abstract_model(cfg, run), nnx.Param)
  tokens = jax.ShapeDtypeStruct(
    (batch_rows, ARGS.seq), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
  )
  fn = jax.jit(lambda p, t: nnx.merge(graphdef, p).hidden(t))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    return _timed(lambda: fn.lower(params, tokens))


def main():
  mesh = make_mesh({"fsdp": ARGS.fsdp, "tensor": ARGS.tensor, "data": -1})
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  cfg = cwm_32b()
  lower_s, compile_s, compiled = train_step(cfg, mesh, rows)
  mem = compiled.memory_analysis()
  scan_lower, scan_compile, _ = forward(cfg, mesh, rows, RUN)
  unroll_lower, unroll_compile, _ = forward(cfg, mesh, rows, RUN.replace(scan_layers=False))
  out = {
    "train_step_compile_s": compile_s,
    "train_step_lower_s": lower_s,
    "forward_scan_compile_s": scan_compile,
    "forward_scan_lower_s": scan_lower,
    "forward_unrolled_compile_s": unroll_compile,
    "forward_unrolled_lower_s": unroll_lower,
    "train_step_temp_gib_per_device": round(mem.temp_size_in_bytes / 2**30, 2),
    "train_step_argument_gib_per_device": round(mem.argument_size_in_bytes / 2**30, 2),
    "mesh": dict(mesh.shape),
    "batch_rows": rows,
    "seq": ARGS.seq,
    "params": cfg.param_count(),
    "attention_impl": RUN.attention_impl,
    "remat_policy": RUN.remat_policy,
  }
  print(json.dumps(out))
  if ARGS.save:
    print("saved", results_io.save("compile_time", out), file=sys.stderr)


if __name__ == "__main__":
  main()
