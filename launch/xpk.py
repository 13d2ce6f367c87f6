#!/usr/bin/env python3
"""Training on TPU slices in GKE through XPK (`pip install xpk`): renders and runs
`xpk workload create`.

  python launch/xpk.py --cluster CLUSTER --workload cwm-pretrain --tpu_type v5p-128 \\
      --num_slices 2 --image REGISTRY/cwm_jax:tpu [--project P --zone Z] \\
      --config configs/cwm_32b.py:stage=pretrain --workdir gs://BUCKET/cwm32b \\
      [--env KEY=VALUE ...] [--max_restarts 10] [--dry_run] [-- TRAIN_FLAGS...]

XPK creates one JobSet job per slice and sets, in every container, TPU_WORKER_ID,
TPU_WORKER_HOSTNAMES and for several slices MEGASCALE_COORDINATOR_ADDRESS,
MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID (the TPU runtime joins the slices over the
data-centre network with them). The command derives the jax.distributed environment read by
`python -m cwm_jax.train` from those (k8s_jobset.TPU_CONTRACT): coordinator slice 0's host
0, process id slice * hosts + host. A preempted slice restarts the workload (up to
--max_restarts), which resumes from the workdir; the workdir is a bucket (gs://), reached
with the nodes' workload identity. The image comes from launch/images/tpu.Dockerfile.
--dry_run prints the xpk command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8s_jobset import TPU_CONTRACT  # pylint: disable=wrong-import-position


def command(args) -> list[str]:
  """The `xpk workload create` argv."""
  train = shlex.join(
    [
      "python",
      "-m",
      "cwm_jax.train",
      f"--config={args.config}",
      f"--workdir={args.workdir}",
      *args.extra,
    ]
  )
  exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in args.env))
  contract = TPU_CONTRACT.replace("PORT", str(args.port)).removesuffix('; exec "$@"')
  inner = (f"export {exports}; " if exports else "") + f"{contract}; exec {train}"
  cmd = [
    "xpk",
    "workload",
    "create",
    f"--cluster={args.cluster}",
    f"--workload={args.workload}",
    f"--tpu-type={args.tpu_type}",
    f"--num-slices={args.num_slices}",
    f"--docker-image={args.image}",
    f"--max-restarts={args.max_restarts}",
  ]
  cmd += [f"--project={args.project}"] if args.project else []
  cmd += [f"--zone={args.zone}"] if args.zone else []
  return cmd + [f"--command=bash -c {shlex.quote(inner)}"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cluster", required=True)
  p.add_argument("--workload", required=True, help="The workload's name (DNS-1123).")
  p.add_argument("--tpu_type", required=True, help="e.g. v5p-128")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--image", required=True, help="Built from launch/images/tpu.Dockerfile.")
  p.add_argument("--project", default="")
  p.add_argument("--zone", default="")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="gs://BUCKET/run")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable).")
  p.add_argument("--max_restarts", type=int, default=10)
  p.add_argument("--port", type=int, default=8476)
  p.add_argument("--dry_run", action="store_true")
  argv = sys.argv[1:] if argv is None else argv
  ours, extra = (
    (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
  )
  args = p.parse_args(ours)
  args.extra = extra
  if args.num_slices < 1:
    p.error("--num_slices must be >= 1")
  if "://" not in args.workdir:
    p.error(f"--workdir {args.workdir!r}: XPK pods share no local disk; use gs://BUCKET/run")
  if any("=" not in kv for kv in args.env):
    p.error("--env takes KEY=VALUE")
  cmd = command(args)
  if args.dry_run:
    print(shlex.join(cmd))
    return 0
  return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
