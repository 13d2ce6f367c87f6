"""Cluster launchers: dry runs print commands whose train flags the real parser accepts."""

import json
import os
import shlex
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parses argv with the flags of `python -m cwm_jax.train` (config_flags reads
# sys.argv when the flags are defined, so each argv needs its own process).
_PARSE = """
import json, sys
sys.argv = ["train", *json.loads(sys.argv[1])]
from absl import flags
import cwm_jax.train.__main__
flags.FLAGS(sys.argv)
print(json.dumps({"workdir": flags.FLAGS.workdir, "config": flags.FLAGS.config.to_dict()}, default=str))
"""


def parse_train_argv(argv):
  """(workdir, config dict) as the train entry point parses `argv`; fails the test otherwise."""
  out = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(argv)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  parsed = json.loads(out.stdout.strip().splitlines()[-1])
  return parsed["workdir"], parsed["config"]


def train_argv(words):
  """The arguments after `-m cwm_jax.train` in a command."""
  i = words.index("cwm_jax.train")
  assert words[i - 1] == "-m"
  return words[i + 1:]


def run(cmd, **kw):
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
  assert out.returncode == 0, out.stderr
  return out.stdout


EXTRA = ["--", "--config.optimizer.lr=0.0005", "--config.total_steps=7"]


def check_parsed(argv, workdir):
  got_workdir, config = parse_train_argv(argv)
  assert got_workdir == workdir
  assert config["optimizer"]["lr"] == 0.0005 and config["total_steps"] == 7
  assert config["schedule"]["order"] == "pretrain,midtrain,sft"


def test_slurm_dry_run_one_process_per_gpu():
  out = run(["bash", "launch/slurm.sbatch", "--config", "configs/smoke.py:schedule=all",
             "--workdir", "/ckpt/run a", "--nodes=2", "--gpus_per_node", "4", "--dry_run", *EXTRA],
            env={**os.environ, "COORDINATOR_HOST": "gpu-node-07"})
  words = shlex.split(out.strip())
  assert words[0] == "srun" and "--ntasks=8" in words and "--ntasks-per-node=4" in words
  assert "--export=ALL,JAX_COORDINATOR_ADDRESS=gpu-node-07:8476" in words
  inner = words[words.index("-c") + 1]
  for var in ("JAX_PROCESS_ID=$SLURM_PROCID", "JAX_NUM_PROCESSES=$SLURM_NTASKS",
              "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID"):
    assert var in inner
  check_parsed(train_argv(words), "/ckpt/run a")


def test_slurm_per_host_and_bad_args():
  out = run(["bash", "launch/slurm.sbatch", "--config", "c.py", "--workdir", "w", "--nodes", "3",
             "--per", "host", "--dry_run"])
  words = shlex.split(out)
  assert "--ntasks=3" in words and "JAX_LOCAL_DEVICE_IDS" not in out
  bad = subprocess.run(["bash", "launch/slurm.sbatch", "--workdir", "w", "--dry_run"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "usage" in bad.stderr


def test_tpu_pod_dry_run():
  out = run(["bash", "launch/tpu_pod.sh", "--tpu", "v5p-128", "--zone=us-east5-a",
             "--project", "proj", "--config", "configs/smoke.py:schedule=all",
             "--workdir", "gs://bucket/run", "--num_workers", "16", "--coordinator", "10.0.0.2",
             "--dry_run", *EXTRA])
  words = shlex.split(out.strip())
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p-128"]
  assert "--worker=all" in words and "--zone=us-east5-a" in words and "--project=proj" in words
  remote = [w for w in words if w.startswith("--command=")][0][len("--command="):]
  assert "JAX_COORDINATOR_ADDRESS=10.0.0.2:8476" in remote
  assert "JAX_NUM_PROCESSES=16" in remote and "agent-worker-number" in remote
  check_parsed(train_argv(shlex.split(remote.split("&&")[-1])), "gs://bucket/run")


def test_tpu_pod_dry_run_without_worker_info_prints_describe():
  out = run(["bash", "launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", "--config", "c.py",
             "--workdir", "w", "--dry_run"])
  assert out.startswith("# gcloud compute tpus tpu-vm describe t")


def test_k8s_jobset_dry_run():
  out = run([sys.executable, "launch/k8s_jobset.py", "--name", "cwm-smoke", "--image", "img:1",
             "--config", "configs/smoke.py:schedule=all", "--workdir", "/ckpt/x",
             "--num_hosts", "4", "--gpus_per_host", "8", "--dry_run", *EXTRA])
  manifest = yaml.safe_load(out)
  assert out.rstrip().endswith("# kubectl apply -f -")
  assert manifest["kind"] == "JobSet"
  job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == 4
  container = job["template"]["spec"]["containers"][0]
  env = {e["name"]: e for e in container["env"]}
  assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "cwm-smoke-workers-0-0.cwm-smoke:8476"
  assert env["JAX_NUM_PROCESSES"]["value"] == "4"
  assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  check_parsed(train_argv(container["command"]), "/ckpt/x")


def test_checked_in_jobset_matches_generator():
  with open(os.path.join(ROOT, "launch", "k8s_jobset.yaml")) as f:
    checked_in = yaml.safe_load(f)
  out = run([sys.executable, "launch/k8s_jobset.py", "--config", "configs/cwm_32b.py:stage=pretrain",
             "--workdir", "/ckpt/cwm32b", "--name", "cwm-pretrain", "--num_hosts", "64",
             "--dry_run"])
  assert yaml.safe_load(out) == checked_in


def test_console_scripts_point_at_run_functions():
  """Every console script of setup.cfg names a module with that top-level function
  (read with ast: the CLI modules define absl flags and cannot share one process)."""
  import ast
  import configparser
  import importlib.util
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
  assert len(lines) >= 9
  for line in lines:
    name, target = (x.strip() for x in line.split("="))
    module, func = target.split(":")
    with open(importlib.util.find_spec(module).origin) as f:
      tree = ast.parse(f.read())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name
