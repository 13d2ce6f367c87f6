#!/usr/bin/env python3
"""Renders (and applies) a Kubernetes JobSet for multi-host training on GPUs or TPU slices.

  python launch/k8s_jobset.py --name cwm-pretrain --image REGISTRY/cwm_jax:gpu \
      --config configs/cwm_32b.py:stage=pretrain --workdir gs://BUCKET/cwm32b \
      --num_hosts 8 --gpus_per_host 8 [--dry_run] [-- TRAIN_FLAGS...]
  python launch/k8s_jobset.py --name cwm-pretrain --image REGISTRY/cwm_jax:tpu \
      --tpu_type v5p-16 --tpu_topology 2x2x2 --num_slices 2 --config ... --workdir gs://...

GPU: one indexed pod per host (`completionMode: Indexed`); each pod gets the
jax.distributed environment read by `python -m cwm_jax.train`:
  JAX_COORDINATOR_ADDRESS  pod 0 via the JobSet's headless service: NAME-workers-0-0.NAME:PORT
  JAX_NUM_PROCESSES        --num_hosts
  JAX_PROCESS_ID           the pod's job-completion index
TPU: one job per slice, one pod per host of the slice, requesting `google.com/tpu` on nodes
selected by cloud.google.com/gke-tpu-accelerator and gke-tpu-topology; the pods get
TPU_WORKER_ID, TPU_WORKER_HOSTNAMES and (several slices) MEGASCALE_*, and the command derives
the three JAX variables from them (TPU_CONTRACT, shared with launch/xpk.py).
Every pod has a memory-backed /dev/shm; the workdir is a bucket (gs://) or a path on
--volume_claim mounted at --mount_path. Images: launch/images/{gpu,tpu}.Dockerfile.
Without --dry_run the manifest is piped to `kubectl apply -f -`; with it, the
manifest and that command are printed. `launch/k8s_jobset.yaml` is this
script's output for 64 GPU hosts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_JOB_INDEX = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
# TPU type prefix -> (GKE accelerator label, TensorCores per chip: v4 and v5p names count
# cores, two per chip; v5e and v6e names count chips).
TPU_ACCELERATORS = {
  "v4": ("tpu-v4-podslice", 2),
  "v5p": ("tpu-v5p-slice", 2),
  "v5litepod": ("tpu-v5-lite-podslice", 1),
  "v6e": ("tpu-v6e-slice", 1),
}
CHIPS_PER_HOST = 4

# The jax.distributed contract on a TPU pod (GKE through a JobSet or XPK), computed in the
# container from what GKE and the TPU webhook set: TPU_WORKER_HOSTNAMES (the slice's hosts),
# TPU_WORKER_ID (this host in its slice) and, with several slices, MEGASCALE_SLICE_ID,
# MEGASCALE_NUM_SLICES, MEGASCALE_COORDINATOR_ADDRESS (slice 0's host 0).
TPU_CONTRACT = (
  "hosts=(${TPU_WORKER_HOSTNAMES//,/ }); n=${#hosts[@]}; s=${MEGASCALE_SLICE_ID:-0}; "
  "coord=${MEGASCALE_COORDINATOR_ADDRESS:-${hosts[0]}}; "
  "export JAX_COORDINATOR_ADDRESS=${coord%%:*}:PORT "
  "JAX_NUM_PROCESSES=$((n * ${MEGASCALE_NUM_SLICES:-1})) "
  'JAX_PROCESS_ID=$((s * n + TPU_WORKER_ID)); exec "$@"'
)


class JobSetError(ValueError):
  pass


def tpu_slice(tpu_type: str, topology: str):
  """(GKE accelerator label, hosts per slice, chips per host) of e.g. v5p-16 with 2x2x2."""
  prefix, _, size = tpu_type.rpartition("-")
  if prefix not in TPU_ACCELERATORS or not size.isdigit():
    raise JobSetError(
      f"--tpu_type {tpu_type!r}: use one of {sorted(TPU_ACCELERATORS)} with a size, e.g. v5p-16"
    )
  accelerator, per_chip = TPU_ACCELERATORS[prefix]
  chips = int(size) // per_chip
  dims = topology.split("x")
  if not all(d.isdigit() for d in dims) or eval_product(dims) != chips:
    raise JobSetError(
      f"--tpu_topology {topology!r} must hold the {chips} chips of {tpu_type} "
      "(e.g. 2x2x2 for v5p-16)"
    )
  per_host = min(chips, CHIPS_PER_HOST)
  return accelerator, chips // per_host, per_host


def eval_product(dims) -> int:
  out = 1
  for d in dims:
    out *= int(d)
  return out


def jobset(
  name,
  image,
  config,
  workdir,
  num_hosts,
  gpus_per_host,
  port=8476,
  extra=(),
  tpu_type="",
  tpu_topology="",
  num_slices=1,
  volume_claim="",
  mount_path="/ckpt",
  env=(),
):
  """The JobSet manifest as a dict: GPU hosts (one job of `num_hosts` pods), or TPU slices
  (`num_slices` jobs, one pod per host of a `tpu_type` slice of `tpu_topology`)."""
  train = ["python", "-m", "cwm_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]
  if "://" not in workdir and not (
    volume_claim and workdir.startswith(mount_path.rstrip("/") + "/")
  ):
    raise JobSetError(
      f"--workdir {workdir!r} is a local path inside the pods: use a gs:// "
      f"workdir, or --volume_claim CLAIM with a workdir under --mount_path "
      f"({mount_path})"
    )
  mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
  volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # the data loader's workers
  if volume_claim:
    mounts.append({"name": "workdir", "mountPath": mount_path})
    volumes.append({"name": "workdir", "persistentVolumeClaim": {"claimName": volume_claim}})
  user_env = [{"name": k, "value": v} for k, v in (kv.split("=", 1) for kv in env)]
  container = {
    "name": "train",
    "image": image,
    "ports": [{"containerPort": port}],
    "volumeMounts": mounts,
  }
  pod = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
  if tpu_type:
    accelerator, hosts, chips = tpu_slice(tpu_type, tpu_topology)
    container["command"] = ["bash", "-c", TPU_CONTRACT.replace("PORT", str(port)), "_", *train]
    slice_env = [{"name": "TPU_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": _INDEX}}}]
    slice_id = "0"
    if num_slices > 1:  # before TPU_WORKER_HOSTNAMES, whose $(MEGASCALE_SLICE_ID) they define
      slice_env += [
        {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {"fieldPath": _JOB_INDEX}}},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}"},
      ]
      slice_id = "$(MEGASCALE_SLICE_ID)"
    # The slice's own hosts, by the JobSet's pod host names (NAME-slice-JOB-POD.NAME).
    slice_env.append(
      {
        "name": "TPU_WORKER_HOSTNAMES",
        "value": ",".join(f"{name}-slice-{slice_id}-{i}.{name}" for i in range(hosts)),
      }
    )
    container["env"] = slice_env + user_env
    container["resources"] = {"limits": {"google.com/tpu": chips}}
    pod["nodeSelector"] = {
      "cloud.google.com/gke-tpu-accelerator": accelerator,
      "cloud.google.com/gke-tpu-topology": tpu_topology,
    }
    replicated = {"name": "slice", "replicas": num_slices, "hosts": hosts}
  else:
    container["command"] = train
    container["env"] = [
      {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-workers-0-0.{name}:{port}"},
      {"name": "JAX_NUM_PROCESSES", "value": str(num_hosts)},
      {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": _INDEX}}},
    ] + user_env
    if gpus_per_host:
      container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_host}}
    replicated = {"name": "workers", "replicas": 1, "hosts": num_hosts}
  job = {
    "parallelism": replicated["hosts"],
    "completions": replicated["hosts"],
    "completionMode": "Indexed",
    "backoffLimit": 0,
    "template": {"spec": pod},
  }
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {"name": name},
    # A failed or preempted pod restarts the whole JobSet, which resumes from the workdir.
    "spec": {
      "failurePolicy": {"maxRestarts": 3},
      "network": {"enableDNSHostnames": True},
      "replicatedJobs": [
        {"name": replicated["name"], "replicas": replicated["replicas"], "template": {"spec": job}}
      ],
    },
  }


def to_yaml(manifest) -> str:
  try:
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False)
  except ImportError:  # JSON is valid YAML for kubectl.
    return json.dumps(manifest, indent=2) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", default="cwm-train")
  p.add_argument(
    "--image",
    default="cwm_jax:gpu",
    help="Built from launch/images/gpu.Dockerfile or tpu.Dockerfile.",
  )
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="gs://BUCKET/run, or a path under --mount_path.")
  p.add_argument("--num_hosts", type=int, default=2, help="GPU hosts.")
  p.add_argument("--gpus_per_host", type=int, default=8)
  p.add_argument("--tpu_type", default="", help="TPU slices instead of GPUs, e.g. v5p-16.")
  p.add_argument("--tpu_topology", default="", help="The slice's chip topology, e.g. 2x2x2.")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--volume_claim", default="", help="A PersistentVolumeClaim for the workdir.")
  p.add_argument("--mount_path", default="/ckpt")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable).")
  p.add_argument("--port", type=int, default=8476)
  p.add_argument("--dry_run", action="store_true")
  argv = sys.argv[1:] if argv is None else argv
  ours, extra = (
    (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
  )
  args = p.parse_args(ours)
  if args.num_hosts < 1 or args.num_slices < 1:
    p.error("--num_hosts and --num_slices must be >= 1")
  if args.tpu_type and not args.tpu_topology:
    p.error("--tpu_type needs --tpu_topology (e.g. 2x2x2 for v5p-16)")
  if args.num_slices > 1 and not args.tpu_type:
    p.error("--num_slices is for TPU slices: pass --tpu_type and --tpu_topology")
  if any("=" not in kv for kv in args.env):
    p.error("--env takes KEY=VALUE")
  try:
    manifest = jobset(
      args.name,
      args.image,
      args.config,
      args.workdir,
      args.num_hosts,
      args.gpus_per_host,
      args.port,
      extra,
      args.tpu_type,
      args.tpu_topology,
      args.num_slices,
      args.volume_claim,
      args.mount_path,
      args.env,
    )
  except JobSetError as e:
    p.error(str(e))
  text = to_yaml(manifest)
  apply = ["kubectl", "apply", "-f", "-"]
  if args.dry_run:
    sys.stdout.write(text)
    print("# " + shlex.join(apply))
    return 0
  return subprocess.run(apply, input=text, text=True, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
