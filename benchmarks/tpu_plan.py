"""The 32B recipe compiled for real TPU slices: every stage on each slice, with libtpu.

  python benchmarks/tpu_plan.py [--stages pretrain,midtrain,sft,rl] \
      [--slices v5p-512,v6e-256] [--out /tmp/tpu_plans]

For each (stage, slice) runs `python -m cwm_jax.plan --config
configs/cwm_32b.py:stage=STAGE,slice=SLICE --topology SLICE` in a fresh
process (one at a time: a 32B compile takes minutes and GBs of host memory),
keeps the plan JSON and the compile time, and prints one JSON object:
{"STAGE@SLICE": {mesh, grad_accum, tokens_per_step, per-device GiB, fits,
step seconds at 50% MFU, days for the stage's token budget at 50% MFU,
compile_seconds, wall_seconds}}. `--out` also keeps each raw plan.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("device_kind", "chips", "mesh", "grad_accum", "batch_size", "seq_len", "tokens_per_step",
        "step", "attention_impl", "argument_gb_per_device", "temp_gb_per_device",
        "total_gb_per_device", "hbm_gb", "fits", "flops_per_step", "step_seconds_at_50pct_mfu",
        "stage_steps", "days_at_50pct_mfu", "compile_seconds")


def plan(stage: str, slice_name: str, out_dir: str | None) -> dict:
  """One compiled plan (its JSON plus wall time), or the error."""
  cmd = [sys.executable, "-m", "cwm_jax.plan", "--config",
         f"configs/cwm_32b.py:stage={stage},slice={slice_name}", "--topology", slice_name]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  wall = round(time.perf_counter() - t0, 1)
  if out_dir:
    with open(os.path.join(out_dir, f"{stage}@{slice_name}.json"), "w") as f:
      f.write(out.stdout)
  try:
    p = json.loads(out.stdout)["stages"][stage]
  except (ValueError, KeyError):
    return {"error": out.stderr.strip().splitlines()[-1:], "exit_code": out.returncode,
            "wall_seconds": wall}
  row = {k: p.get(k) for k in KEYS}
  row.update(exit_code=out.returncode, wall_seconds=wall)
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--stages", default="pretrain,midtrain,sft,rl")
  ap.add_argument("--slices", default="v5p-512,v6e-256")
  ap.add_argument("--out", default=None, help="directory for the raw plan JSON of each run")
  args = ap.parse_args()
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  result = {f"{st}@{sl}": plan(st, sl, args.out)
            for st in args.stages.split(",") for sl in args.slices.split(",")}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
