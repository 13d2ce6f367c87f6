"""Cluster launchers: dry runs print commands whose train flags the real parser accepts."""

import json
import os
import re
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
  out = subprocess.run(
    [sys.executable, "-c", _PARSE, json.dumps(argv)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  parsed = json.loads(out.stdout.strip().splitlines()[-1])
  return parsed["workdir"], parsed["config"]


def train_argv(words):
  """The arguments after `-m cwm_jax.train` in a command."""
  i = words.index("cwm_jax.train")
  assert words[i - 1] == "-m"
  return words[i + 1 :]


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
  out = run(
    [
      "bash",
      "launch/slurm.sbatch",
      "--config",
      "configs/smoke.py:schedule=all",
      "--workdir",
      "/ckpt/run a",
      "--nodes=2",
      "--gpus_per_node",
      "4",
      "--dry_run",
      *EXTRA,
    ],
    env={**os.environ, "COORDINATOR_HOST": "gpu-node-07"},
  )
  words = shlex.split(out.strip())
  assert words[0] == "srun" and "--ntasks=8" in words and "--ntasks-per-node=4" in words
  assert "--export=ALL,JAX_COORDINATOR_ADDRESS=gpu-node-07:8476" in words
  inner = words[words.index("-c") + 1]
  for var in (
    "JAX_PROCESS_ID=$SLURM_PROCID",
    "JAX_NUM_PROCESSES=$SLURM_NTASKS",
    "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID",
  ):
    assert var in inner
  check_parsed(train_argv(words), "/ckpt/run a")


def test_slurm_preemption_container_and_gpu_settings():
  with open(os.path.join(ROOT, "launch", "slurm.sbatch")) as f:
    header = [l.split()[1] for l in f if l.startswith("#SBATCH ")]
  assert "--requeue" in header and any(re.fullmatch(r"--signal=TERM@\d+", h) for h in header)
  out = run(
    [
      "bash",
      "launch/slurm.sbatch",
      "--config",
      "configs/smoke.py:schedule=all",
      "--workdir",
      "/ckpt/r",
      "--container_image",
      "nvcr.io/org/cwm:1",
      "--container_mounts",
      "/data:/data",
      "--dry_run",
      *EXTRA,
    ],
    env={**os.environ, "XLA_FLAGS": "--xla_dump_to=/tmp/d", "NCCL_PROTO": "Simple"},
  )
  words = shlex.split(out.strip())
  assert "--container-image=nvcr.io/org/cwm:1" in words
  assert "--container-mounts=/data:/data,/ckpt/r:/ckpt/r" in words  # the workdir is mounted
  env_args = words[words.index("env") + 1 : words.index("-m") - 1]
  env = dict(a.split("=", 1) for a in env_args)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true"
  assert env["NCCL_PROTO"] == "Simple"  # the caller's setting wins
  assert (
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
  )
  check_parsed(train_argv(words), "/ckpt/r")
  gcs = shlex.split(
    run(
      [
        "bash",
        "launch/slurm.sbatch",
        "--config",
        "c.py",
        "--workdir",
        "gs://b/r",
        "--container_image",
        "img",
        "--dry_run",
      ]
    )
  )
  assert not any(w.startswith("--container-mounts") for w in gcs)  # a bucket is not mounted


def test_slurm_per_host_and_bad_args():
  out = run(
    [
      "bash",
      "launch/slurm.sbatch",
      "--config",
      "c.py",
      "--workdir",
      "w",
      "--nodes",
      "3",
      "--per",
      "host",
      "--dry_run",
    ]
  )
  words = shlex.split(out)
  assert "--ntasks=3" in words and "JAX_LOCAL_DEVICE_IDS" not in out
  bad = subprocess.run(
    ["bash", "launch/slurm.sbatch", "--workdir", "w", "--dry_run"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 2 and "usage" in bad.stderr


def _tpu_vm():
  import importlib.util

  spec = importlib.util.spec_from_file_location("tpu_vm", os.path.join(ROOT, "launch", "tpu_vm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def commands(out):
  """The commands a dry run printed (one may span lines inside quotes); comments skipped."""
  cmds, pending = [], ""
  for line in out.splitlines():
    pending += line if not pending else "\n" + line
    try:
      words = shlex.split(pending, comments=True)
    except ValueError:  # an open quote: the command goes on
      continue
    if words:
      cmds.append(words)
    pending = ""
  assert not pending
  return cmds


def test_tpu_pod_dry_run_queued_resource_multislice():
  out = run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "--tpu",
      "cwm",
      "--zone=us-east5-a",
      "--project",
      "proj",
      "--accelerator_type",
      "v5p-16",
      "--num_slices",
      "2",
      "--spot",
      "--config",
      "configs/smoke.py:schedule=all",
      "--workdir",
      "gs://bucket/run",
      "--num_workers",
      "2",
      "--coordinator",
      "10.0.0.2",
      "--env",
      "XLA_FLAGS=--x=1",
      "--dry_run",
      *EXTRA,
    ]
  )
  cmds = commands(out)
  # Order: create the queued resource, wait, build and install the code, start, supervise, delete.
  assert cmds[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "cwm"]
  assert {
    "--accelerator-type=v5p-16",
    "--node-count=2",
    "--node-prefix=cwm",
    "--spot",
    "--zone=us-east5-a",
    "--project=proj",
  } <= set(cmds[0])
  assert cmds[1][4] == "describe" and "--format=value(state.state)" in cmds[1]
  assert cmds[2][1:4] == ["-m", "pip", "wheel"] and cmds[2][-1] == ROOT
  for node in ("cwm-0", "cwm-1"):
    scp = [c for c in cmds if c[4] == "scp" and f"{node}:~/cwm_jax_dist/" in c][0]
    assert {
      os.path.join(ROOT, "launch", "install.sh"),
      os.path.join(ROOT, "constraints.txt"),
    } <= set(scp)
    assert any(c[4:6] == ["ssh", node] and "install.sh ~/cwm_jax_venv tpu" in c[-1] for c in cmds)
  starts = [c for c in cmds if c[4] == "ssh" and "cwm_jax.train" in c[-1]]
  assert [c[5] for c in starts] == ["cwm-0", "cwm-1"] and all("--worker=all" in c for c in starts)
  for slice_id, start in enumerate(starts):
    remote = start[-1][len("--command=") :]
    assert "nohup setsid bash ~/cwm_jax_run/worker.sh" in remote
    words = shlex.split(remote)
    script = words[words.index("echo") + 1]
    export = [l for l in script.splitlines() if l.startswith("export ")][0]
    env = dict(re.findall(r"(\w+)=(\$\(\(.*?\)\)|\S+)", export))
    assert env["JAX_COORDINATOR_ADDRESS"] == "10.0.0.2:8476" and env["JAX_NUM_PROCESSES"] == "4"
    assert env["JAX_PROCESS_ID"] == f"$(({slice_id} * 2 + w))"
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_SLICE_ID"] == str(slice_id)
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "10.0.0.2:8080" and env["XLA_FLAGS"] == "--x=1"
    assert "gcloud storage cp" in script and "gs://bucket/run/logs/worker-$id.log" in script
    train = [l for l in script.splitlines() if "cwm_jax.train" in l][0]
    check_parsed(train_argv(shlex.split(train.split(">")[0])), "gs://bucket/run")
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "cwm"]


def test_tpu_pod_existing_vm_and_bad_args():
  out = run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "--tpu",
      "t",
      "--zone",
      "z",
      "--config",
      "c.py",
      "--workdir",
      "/mnt/run",
      "--dry_run",
    ]
  )
  cmds = commands(out)
  assert not any("queued-resources" in c for c in cmds)  # an existing TPU VM: nothing created
  assert any(c[4:6] == ["describe", "t"] for c in cmds)
  assert 'cp "$log" /mnt/run/logs/worker-$id.log' in out
  for bad in (
    ["--zone", "z", "--config", "c", "--workdir", "w"],
    ["--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "w", "--env", "NOEQ"],
  ):
    out = subprocess.run(
      ["bash", "launch/tpu_pod.sh", *bad, "--dry_run"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and "usage" in out.stderr


class FakeGcloud:
  """Answers the launcher's gcloud commands from scripted replies (the last one repeats)."""

  def __init__(self, **replies):
    self.replies = {k: list(v) for k, v in replies.items()}
    self.calls = []

  def kind(self, cmd):
    if cmd[1:4] == ["-m", "pip", "wheel"]:
      return "wheel"
    verb = cmd[4]
    if cmd[3] == "queued-resources":
      return "qr_" + verb
    if verb == "describe":
      return "ips" if "networkEndpoints" in cmd[-1] else "node_state"
    if verb == "ssh" and "cwm_jax_run/status 2>" in cmd[-1]:
      return "status"
    if verb == "ssh" and "cwm_jax.train" in cmd[-1]:
      return "start"
    return verb

  def __call__(self, cmd, check=True):
    kind = self.kind(cmd)
    self.calls.append(kind)
    queue = self.replies.get(kind, [""])
    return queue.pop(0) if len(queue) > 1 else queue[0]


def _supervise(fake, *flags):
  tpu_vm = _tpu_vm()
  args = tpu_vm.parse_args(
    [
      "--tpu",
      "cwm",
      "--zone",
      "z",
      "--config",
      "c.py",
      "--workdir",
      "gs://b/r",
      "--poll_s",
      "0",
      *flags,
    ]
  )
  launcher = tpu_vm.Launcher(args, run=fake, sleep=lambda s: None, out=open(os.devnull, "w"))
  launcher.dist = os.path.join(ROOT, "build", "test_tpu_vm_dist")
  return launcher.main(), launcher


def test_tpu_supervisor_relaunches_after_preemption_until_finished():
  fake = FakeGcloud(
    qr_describe=["ACCEPTED", "ACTIVE", "ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE", "ACTIVE"],
    ips=["10.0.0.2;10.0.0.3"],
    node_state=["READY"],
    status=["running 11\nrunning 12", "exit 0 term 0\nexit 0 term 0"],
  )
  rc, launcher = _supervise(fake, "--accelerator_type", "v5p-16")
  assert rc == 0 and launcher.restarts == 1
  calls = [c for c in fake.calls if c not in ("node_state", "qr_describe")]
  assert calls == [
    "qr_create",
    "wheel",
    "ssh",
    "scp",
    "ssh",
    "ips",
    "start",
    "status",
    # preempted: the suspended queued resource is replaced, the code reinstalled
    "qr_delete",
    "qr_create",
    "wheel",
    "ssh",
    "scp",
    "ssh",
    "ips",
    "start",
    "status",
    "qr_delete",
  ]


def test_tpu_supervisor_sigterm_relaunches_and_user_errors_stop():
  fake = FakeGcloud(
    ips=["10.0.0.2"], node_state=["READY"], status=["exit 0 term 1", "exit 2 term 0"]
  )
  rc, launcher = _supervise(fake)
  assert rc == 2 and launcher.restarts == 1 and fake.calls.count("start") == 2
  assert "qr_create" not in fake.calls and "qr_delete" not in fake.calls  # an existing TPU VM
  fake = FakeGcloud(
    ips=["10.0.0.2"], node_state=["READY", "PREEMPTED", "PREEMPTED", "READY"], status=["lost"]
  )
  rc, launcher = _supervise(fake, "--max_restarts", "2")
  assert rc == 1 and launcher.restarts == 2 and fake.calls.count("start") == 3


def test_k8s_jobset_dry_run():
  out = run(
    [
      sys.executable,
      "launch/k8s_jobset.py",
      "--name",
      "cwm-smoke",
      "--image",
      "img:1",
      "--config",
      "configs/smoke.py:schedule=all",
      "--workdir",
      "/ckpt/x",
      "--volume_claim",
      "ckpt",
      "--num_hosts",
      "4",
      "--gpus_per_host",
      "8",
      "--dry_run",
      *EXTRA,
    ]
  )
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


def _fake_python(tmp_path):
  """A `python` on PATH that prints its environment's JAX_*/MEGASCALE_* and argv as JSON."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  fake = bindir / "python"
  fake.write_text(
    f"#!{sys.executable}\nimport json, os, sys\n"
    "print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in "
    "os.environ.items() if k.startswith(('JAX_', 'MEGASCALE_', 'A'))}}))\n"
  )
  fake.chmod(0o755)
  return str(bindir)


def _in_pod(command, env, tmp_path):
  """Runs a container command the way the pod would, with GKE's TPU variables set."""
  pod_env = {"PATH": _fake_python(tmp_path) + os.pathsep + os.environ["PATH"], **env}
  out = subprocess.run(command, capture_output=True, text=True, env=pod_env)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout)


def test_k8s_jobset_tpu_multislice(tmp_path):
  out = run(
    [
      sys.executable,
      "launch/k8s_jobset.py",
      "--name",
      "cwm",
      "--image",
      "reg/cwm:tpu",
      "--config",
      "configs/smoke.py:schedule=all",
      "--workdir",
      "gs://bucket/run",
      "--tpu_type",
      "v5p-16",
      "--tpu_topology",
      "2x2x2",
      "--num_slices",
      "2",
      "--dry_run",
      *EXTRA,
    ]
  )
  spec = yaml.safe_load(out)["spec"]["replicatedJobs"][0]
  assert spec["name"] == "slice" and spec["replicas"] == 2
  job = spec["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 2  # v5p-16: 8 chips, 4 per host
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "2x2x2",
  }
  container = pod["containers"][0]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
  assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
  env = {e["name"]: e for e in container["env"]}
  names = [e["name"] for e in container["env"]]
  assert names.index("MEGASCALE_SLICE_ID") < names.index("TPU_WORKER_HOSTNAMES")
  assert (
    "jobset.sigs.k8s.io/job-index"
    in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  )
  # The pod of slice 1, host 1: Kubernetes expands $(MEGASCALE_SLICE_ID) in the host names.
  hosts = env["TPU_WORKER_HOSTNAMES"]["value"].replace("$(MEGASCALE_SLICE_ID)", "1")
  got = _in_pod(
    container["command"],
    {
      "TPU_WORKER_ID": "1",
      "TPU_WORKER_HOSTNAMES": hosts,
      "MEGASCALE_SLICE_ID": "1",
      "MEGASCALE_NUM_SLICES": env["MEGASCALE_NUM_SLICES"]["value"],
      "MEGASCALE_COORDINATOR_ADDRESS": env["MEGASCALE_COORDINATOR_ADDRESS"]["value"],
    },
    tmp_path,
  )
  assert got["env"]["JAX_COORDINATOR_ADDRESS"] == "cwm-slice-0-0.cwm:8476"
  assert (got["env"]["JAX_NUM_PROCESSES"], got["env"]["JAX_PROCESS_ID"]) == ("4", "3")
  check_parsed(train_argv(["python", *got["argv"]]), "gs://bucket/run")


def test_k8s_jobset_workdir_volume_and_bad_args():
  out = run(
    [
      sys.executable,
      "launch/k8s_jobset.py",
      "--config",
      "c.py",
      "--workdir",
      "/ckpt/x",
      "--volume_claim",
      "cwm-ckpt",
      "--dry_run",
    ]
  )
  pod = yaml.safe_load(out)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert {"name": "workdir", "persistentVolumeClaim": {"claimName": "cwm-ckpt"}} in pod["volumes"]
  assert {"name": "workdir", "mountPath": "/ckpt"} in pod["containers"][0]["volumeMounts"]
  for bad in (
    ["--workdir", "/ckpt/x"],  # a local path with nothing mounted
    ["--workdir", "gs://b/r", "--tpu_type", "v5p-16"],
    ["--workdir", "gs://b/r", "--tpu_type", "v5p-16", "--tpu_topology", "2x2"],
    ["--workdir", "gs://b/r", "--num_slices", "2"],
  ):
    out = subprocess.run(
      [sys.executable, "launch/k8s_jobset.py", "--config", "c.py", *bad, "--dry_run"],
      cwd=ROOT,
      capture_output=True,
      text=True,
    )
    assert out.returncode == 2 and "error:" in out.stderr, bad


def test_xpk_dry_run_runs_the_contract(tmp_path):
  out = run(
    [
      sys.executable,
      "launch/xpk.py",
      "--cluster",
      "tpu-cluster",
      "--workload",
      "cwm-pre",
      "--tpu_type",
      "v5p-128",
      "--num_slices",
      "2",
      "--image",
      "reg/cwm:tpu",
      "--project",
      "p",
      "--zone",
      "us-east5-a",
      "--config",
      "configs/smoke.py:schedule=all",
      "--workdir",
      "gs://bucket/run",
      "--env",
      "A_SETTING=x y",
      "--dry_run",
      *EXTRA,
    ]
  )
  words = shlex.split(out)
  assert words[:3] == ["xpk", "workload", "create"]
  assert {
    "--cluster=tpu-cluster",
    "--workload=cwm-pre",
    "--tpu-type=v5p-128",
    "--num-slices=2",
    "--docker-image=reg/cwm:tpu",
    "--project=p",
    "--zone=us-east5-a",
  } <= set(words)
  command = [w for w in words if w.startswith("--command=")][0][len("--command=") :]
  # Slice 0, host 3 of a 16-host slice, with the variables XPK sets.
  got = _in_pod(
    shlex.split(command),
    {
      "TPU_WORKER_ID": "3",
      "TPU_WORKER_HOSTNAMES": ",".join(f"h{i}" for i in range(16)),
      "MEGASCALE_SLICE_ID": "0",
      "MEGASCALE_NUM_SLICES": "2",
      "MEGASCALE_COORDINATOR_ADDRESS": "h0",
    },
    tmp_path,
  )
  assert got["env"]["JAX_COORDINATOR_ADDRESS"] == "h0:8476" and got["env"]["A_SETTING"] == "x y"
  assert (got["env"]["JAX_NUM_PROCESSES"], got["env"]["JAX_PROCESS_ID"]) == ("32", "3")
  check_parsed(train_argv(["python", *got["argv"]]), "gs://bucket/run")
  bad = subprocess.run(
    [
      sys.executable,
      "launch/xpk.py",
      "--cluster",
      "c",
      "--workload",
      "w",
      "--tpu_type",
      "v5p-8",
      "--image",
      "i",
      "--config",
      "c.py",
      "--workdir",
      "/local",
      "--dry_run",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 2 and "gs://" in bad.stderr


def test_checked_in_jobset_matches_generator():
  with open(os.path.join(ROOT, "launch", "k8s_jobset.yaml")) as f:
    checked_in = yaml.safe_load(f)
  out = run(
    [
      sys.executable,
      "launch/k8s_jobset.py",
      "--config",
      "configs/cwm_32b.py:stage=pretrain",
      "--workdir",
      "/ckpt/cwm32b",
      "--volume_claim",
      "cwm-ckpt",
      "--name",
      "cwm-pretrain",
      "--num_hosts",
      "64",
      "--dry_run",
    ]
  )
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


def test_images_install_with_the_install_script():
  """One image recipe per platform; each installs this checkout with launch/install.sh and
  the platform's extra."""
  for platform, extra in (("tpu", "tpu"), ("gpu", "cuda12")):
    with open(os.path.join(ROOT, "launch", "images", f"{platform}.Dockerfile")) as f:
      steps = [l.split(None, 1) for l in f if l.strip() and not l.startswith("#")]
    runs = [rest.strip() for op, rest in steps if op == "RUN"]
    assert runs == [f"bash launch/install.sh /opt/venv {extra}"], platform
    assert ["COPY", ". .\n"] in steps
