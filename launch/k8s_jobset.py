#!/usr/bin/env python3
"""Renders (and applies) a Kubernetes JobSet for multi-host training.

  python launch/k8s_jobset.py --name cwm-pretrain --image REGISTRY/cwm_jax:TAG \
      --config configs/cwm_32b.py:stage=pretrain --workdir /ckpt/cwm32b \
      --num_hosts 8 --gpus_per_host 8 [--dry_run] [-- TRAIN_FLAGS...]

One indexed pod per host (`completionMode: Indexed`); each pod gets the
jax.distributed environment read by `python -m cwm_jax.train`:
  JAX_COORDINATOR_ADDRESS  pod 0 via the JobSet's headless service: NAME-workers-0-0.NAME:PORT
  JAX_NUM_PROCESSES        --num_hosts
  JAX_PROCESS_ID           the pod's job-completion index
Without --dry_run the manifest is piped to `kubectl apply -f -`; with it, the
manifest and that command are printed. `launch/k8s_jobset.yaml` is this
script's output for the defaults.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def jobset(name, image, config, workdir, num_hosts, gpus_per_host, port=8476, extra=()):
  """The JobSet manifest as a dict."""
  env = [
      {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-workers-0-0.{name}:{port}"},
      {"name": "JAX_NUM_PROCESSES", "value": str(num_hosts)},
      {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": _INDEX}}},
  ]
  container = {
      "name": "train", "image": image,
      "command": ["python", "-m", "cwm_jax.train", f"--config={config}", f"--workdir={workdir}",
                  *extra],
      "env": env, "ports": [{"containerPort": port}],
  }
  if gpus_per_host:
    container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_host}}
  job = {"parallelism": num_hosts, "completions": num_hosts, "completionMode": "Indexed",
         "backoffLimit": 0,
         "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
      "metadata": {"name": name},
      "spec": {"failurePolicy": {"maxRestarts": 3},
               "network": {"enableDNSHostnames": True},
               "replicatedJobs": [{"name": "workers", "replicas": 1,
                                   "template": {"spec": job}}]},
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
  p.add_argument("--image", default="cwm_jax:latest")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--num_hosts", type=int, default=2)
  p.add_argument("--gpus_per_host", type=int, default=8)
  p.add_argument("--port", type=int, default=8476)
  p.add_argument("--dry_run", action="store_true")
  args, extra = p.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  if args.num_hosts < 1:
    p.error("--num_hosts must be >= 1")
  text = to_yaml(jobset(args.name, args.image, args.config, args.workdir, args.num_hosts,
                        args.gpus_per_host, args.port, extra))
  apply = ["kubectl", "apply", "-f", "-"]
  if args.dry_run:
    sys.stdout.write(text)
    print("# " + shlex.join(apply))
    return 0
  return subprocess.run(apply, input=text, text=True, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
