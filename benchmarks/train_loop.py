"""End-to-end trainer throughput on the smoke config (synthetic packed data).

  python benchmarks/train_loop.py [--steps 30] [--devices 1] [--mesh fsdp=1] [--arg dtype=float32]
      [--save]

Runs `cwm_jax.train.lm.train` (checkpoint only at the end) and reports the
median tokens/s, step time and MFU of the logged steps after the first two
(which include compilation), plus the wall time of the first step. Prints one
JSON object; `--save` also writes it under benchmarks/results/train_loop/ (`results_io`).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io


def _args():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--mesh", default="fsdp=1", help="e.g. fsdp=4,tensor=2")
  p.add_argument("--arg", default="", help="configs/smoke.py variant, e.g. dtype=bfloat16")
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  return p.parse_args()


def main():
  args = _args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  import importlib.util  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from cwm_jax.train.lm import train  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(root, "configs/smoke.py"))
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)
  c = smoke.get_config(args.arg)
  c.total_steps, c.checkpoint_every, c.metrics.tensorboard = args.steps, 0, False
  c.mesh.update({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
  c.mesh.update({k: 1 for k in ("data", "fsdp", "tensor", "sequence") if k not in args.mesh})
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    out = train(c, workdir, devices=jax.devices()[: args.devices])
  wall = time.perf_counter() - t0
  rec = out["records"]
  steady = rec[2:] or rec
  med = lambda k: statistics.median(r[k] for r in steady)
  result = {
    "benchmark": "train_loop",
    "config": f"configs/smoke.py:{args.arg}",
    "mesh": args.mesh,
    "devices": args.devices,
    "device_kind": jax.devices()[0].device_kind,
    "batch_size": c.batch_size,
    "seq_len": c.seq_len,
    "steps": args.steps,
    "tokens_per_sec": round(med("tokens_per_sec"), 1),
    "step_time_ms": round(1e3 * med("step_time"), 2),
    "mfu": med("mfu"),
    "first_step_s": round(rec[0]["step_time"], 2),
    "wall_s": round(wall, 1),
    "loss_first": rec[0]["loss"],
    "loss_last": rec[-1]["loss"],
    "load_avg_1m": os.getloadavg()[0],
  }
  print(json.dumps(result))
  if args.save:
    print("saved", results_io.save("train_loop", result), file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
