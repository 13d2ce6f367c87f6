"""The 32B recipe compiled for real TPU slices: every stage on each slice, with libtpu.

  python benchmarks/tpu_plan.py [--stages pretrain,midtrain,sft,rl] \
      [--slices v5p-512,v6e-256] [--out /tmp/tpu_plans] [--noestimate] [--save]
  python benchmarks/tpu_plan.py --from_dir /tmp/tpu_plans [--save]   # summarize kept plans

For each (stage, slice) runs `python -m cwm_jax.plan --config
configs/cwm_32b.py:stage=STAGE,slice=SLICE --topology SLICE` in a fresh
process (one at a time: a 32B compile takes minutes and GBs of host memory),
keeps the plan JSON and the compile time, and prints one JSON object:
{"STAGE@SLICE": {mesh, grad_accum, tokens_per_step, per-device GiB, fits,
step seconds at 50% MFU, days for the stage's token budget at 50% MFU,
the TPU cost model's estimated step seconds, MFU, breakdown by kind and days
(`cwm_jax.train.cost_model`), compile_seconds, wall_seconds}}. `--out` also
keeps each raw plan as STAGE@SLICE.json; `--from_dir` prints the same summary
from such kept plans without compiling again. `--save` also writes the summary under
benchmarks/results/tpu_plan/ (`results_io`), with the raw plans it was made from in the
record's "plans" ({STAGE@SLICE: the plan's JSON, or null if it was not JSON}) and
"analytic_bounds" (`analytic_bounds`: per STAGE@SLICE of --stages x --slices, the splash
kernels' time and the model's matmuls at peak, and the MFU those alone allow; no compile;
`--bounds_only` prints just these).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = (
  "device_kind",
  "chips",
  "mesh",
  "grad_accum",
  "batch_size",
  "seq_len",
  "tokens_per_step",
  "step",
  "attention_impl",
  "argument_gb_per_device",
  "temp_gb_per_device",
  "total_gb_per_device",
  "hbm_gb",
  "fits",
  "flops_per_step",
  "step_seconds_at_50pct_mfu",
  "stage_steps",
  "days_at_50pct_mfu",
  "estimated_step_seconds",
  "estimated_mfu",
  "estimated_seconds_by_kind",
  "days_at_estimated_mfu",
  "estimate_method",
  "estimate_points",
  "estimate_error",
  "peak_gb_per_device",
  "peak_program",
  "kernel_efficiency",
  "remat",
  "compile_seconds",
  "estimate_compile_seconds",
)


def summarize(stage: str, text: str) -> dict | None:
  """The KEYS of one stage's plan in a `cwm_jax.plan` JSON output, or None."""
  try:
    p = json.loads(text)["stages"][stage]
  except (ValueError, KeyError):
    return None
  return {k: p.get(k) for k in KEYS}


def _json_or_none(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return None


def plan(
  stage: str, slice_name: str, out_dir: str | None, estimate: bool = True
) -> tuple[dict, str]:
  """One compiled plan's summary (plus wall time) or the error, and the plan's raw output."""
  cmd = [
    sys.executable,
    "-m",
    "cwm_jax.plan",
    "--config",
    f"configs/cwm_32b.py:stage={stage},slice={slice_name}",
    "--topology",
    slice_name,
    "--estimate" if estimate else "--noestimate",
  ]
  t0 = time.perf_counter()
  out = subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )
  wall = round(time.perf_counter() - t0, 1)
  if out_dir:
    with open(os.path.join(out_dir, f"{stage}@{slice_name}.json"), "w") as f:
      f.write(out.stdout)
  row = summarize(stage, out.stdout)
  if row is None:
    error = out.stderr.strip().splitlines()[-1:]
    return {"error": error, "exit_code": out.returncode, "wall_seconds": wall}, out.stdout
  row.update(exit_code=out.returncode, wall_seconds=wall)
  return row, out.stdout


def analytic_bounds(stages: list[str], slices: list[str]) -> dict:
  """Per STAGE@SLICE, without compiling: the splash kernels' time as the estimate costs it
  (`cost_model.kernel_flops_per_device` at KERNEL_EFFICIENCY), the model's matmul FLOPs at
  peak (the forward again under remat 'full' or 'attention'), and the MFU bound those two alone allow
  (everything else at zero time). What a stage can reach whatever the XLA part does."""
  sys.path.insert(0, ROOT)
  from cwm_jax.model.execution import reruns_attention_forward  # pylint: disable=g-import-not-at-top
  from cwm_jax.recipe import grids  # pylint: disable=g-import-not-at-top
  from cwm_jax.recipe import stages as stages_lib  # pylint: disable=g-import-not-at-top
  from cwm_jax.train import cost_model, flops, topology  # pylint: disable=g-import-not-at-top
  from cwm_jax.train.config import execution_config, model_config  # pylint: disable=g-import-not-at-top

  out = {}
  for sl in slices:
    peak = topology.slice_spec(sl).chip.peak_tflops * 1e12
    for st in stages:
      ((_, c),) = stages_lib.stage_configs(
        grids.parse_config(f"configs/cwm_32b.py:stage={st},slice={sl}")
      )
      cfg, run = model_config(c), execution_config(c)
      mesh = {k: int(v) for k, v in dict(c.mesh).items()}
      devices = math.prod(mesh.values())
      tokens = c.batch_size * c.seq_len
      step_flops = flops.flops_per_token(cfg, c.seq_len) * tokens
      kernel_flops = cost_model.kernel_flops_per_device(
        cfg,
        c.seq_len,
        c.batch_size // c.grad_accum,
        mesh,
        reruns_attention_forward(run.remat_policy),
        run.context_parallel,
        run.splash_fused_backward,
      )
      kernel = kernel_flops * c.grad_accum / (peak * cost_model.KERNEL_EFFICIENCY)
      recompute = 4 / 3 if run.remat_policy in ("full", "attention") else 1.0
      matmul = 6 * flops.matmul_params(cfg) * tokens * recompute / (devices * peak)
      out[f"{st}@{sl}"] = {
        "mesh": mesh,
        "grad_accum": c.grad_accum,
        "remat": run.remat_policy,
        "attention_flops_share": flops.attention_flops_per_token(cfg, c.seq_len)
        / flops.flops_per_token(cfg, c.seq_len),
        "step_seconds_at_100pct_mfu": step_flops / (devices * peak),
        "attention_kernel_seconds": kernel,
        "matmul_seconds_at_peak": matmul,
        "mfu_bound_kernels_and_matmuls": step_flops / (devices * peak * (kernel + matmul)),
        "kernel_efficiency": cost_model.KERNEL_EFFICIENCY,
      }
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--stages", default="pretrain,midtrain,sft,rl")
  ap.add_argument("--slices", default="v5p-512,v6e-256")
  ap.add_argument("--out", default=None, help="directory for the raw plan JSON of each run")
  ap.add_argument(
    "--noestimate",
    action="store_true",
    help="skip the cost-model estimate (two more compiles per stage)",
  )
  ap.add_argument(
    "--from_dir",
    default=None,
    help="summarize the STAGE@SLICE.json plans kept there by --out instead",
  )
  ap.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  ap.add_argument(
    "--bounds_only",
    action="store_true",
    help="print the analytic kernel + matmul MFU bounds (no compiles) and exit",
  )
  args = ap.parse_args()
  bounds = analytic_bounds(args.stages.split(","), args.slices.split(","))
  if args.bounds_only:
    print(json.dumps(bounds, indent=1))
    return
  result, raw = {}, {}
  if args.from_dir:
    for name in sorted(os.listdir(args.from_dir)):
      if name.endswith(".json") and "@" in name:
        with open(os.path.join(args.from_dir, name)) as f:
          raw[name[:-5]] = f.read()
        result[name[:-5]] = summarize(name.split("@")[0], raw[name[:-5]])
  else:
    if args.out:
      os.makedirs(args.out, exist_ok=True)
    for st in args.stages.split(","):
      for sl in args.slices.split(","):
        result[f"{st}@{sl}"], raw[f"{st}@{sl}"] = plan(st, sl, args.out, not args.noestimate)
  print(json.dumps(result, indent=1))
  if args.save:
    plans = {key: _json_or_none(text) for key, text in raw.items()}
    extra = {"plans": plans, "analytic_bounds": bounds}
    print("saved", results_io.save("tpu_plan", result, extra=extra), file=sys.stderr)


if __name__ == "__main__":
  main()
