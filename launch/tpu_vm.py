#!/usr/bin/env python3
"""Training on Cloud TPU VMs from nothing, supervised until the run is finished.

  python launch/tpu_vm.py --tpu NAME --zone ZONE [--project P] \\
      [--accelerator_type v5p-128 --runtime_version v2-alpha-tpuv5 [--spot]] [--num_slices 2] \\
      --config configs/cwm_32b.py:stage=pretrain --workdir gs://BUCKET/cwm32b \\
      [--env KEY=VALUE ...] [--max_restarts 20] [--poll_s 60] [--keep] [--dry_run] \\
      [-- TRAIN_FLAGS...]

1. With --accelerator_type, a queued resource NAME is created (one node NAME, or NAME-0 ...
   NAME-{S-1} for --num_slices S) and waited on until ACTIVE; without it the TPU VM NAME
   (or NAME-0 ... for several slices) must exist.
2. A wheel of this checkout, launch/install.sh and constraints.txt are copied to every
   worker, which installs them into ~/cwm_jax_venv (`install.sh ... tpu`).
3. Every worker starts one background process (nohup, its own session: a dropped ssh
   connection does not stop it) running `python -m cwm_jax.train` with the jax.distributed
   environment (JAX_COORDINATOR_ADDRESS = slice 0's worker 0, JAX_NUM_PROCESSES,
   JAX_PROCESS_ID = slice * workers + worker) and, for several slices, MEGASCALE_* (the
   coordinator, slice count and slice id the TPU runtime joins the slices with). Its output
   goes to WORKDIR/logs/worker-N.log (copied there every minute and at exit when WORKDIR is
   a gs:// path).
4. The supervisor polls the queued resource / TPU state and the workers' status files. A
   preempted or suspended slice, a maintenance restart or a worker stopped by SIGTERM makes
   it relaunch (re-creating the queued resource when it was lost); the trainer resumes from
   the workdir's last checkpoint. It stops when every worker exited 0 without SIGTERM (the
   stage is finished), or on exit 2 or 3 (a user error or non-finite loss: a relaunch would
   fail again), or after --max_restarts relaunches.
5. The queued resource is deleted at the end unless --keep.

--dry_run prints every command in order instead of running it (the supervisor's loop as
comments).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 8476
MEGASCALE_PORT = 8080
REMOTE_DIST = "~/cwm_jax_dist"
REMOTE_RUN = "~/cwm_jax_run"
VENV = "~/cwm_jax_venv"
WORKER_ID = (
  "$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/"
  "computeMetadata/v1/instance/attributes/agent-worker-number)"
)
# A finished stage; a user error or a non-finite loss: relaunching cannot help.
FINAL_CODES = (2, 3)


class LaunchError(Exception):
  pass


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tpu", required=True, help="TPU VM / queued resource name.")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument(
    "--accelerator_type", default="", help="Create a queued resource of this type (e.g. v5p-128)."
  )
  p.add_argument(
    "--runtime_version",
    default="v2-alpha-tpuv5",
    help="TPU software version of a created queued resource.",
  )
  p.add_argument("--spot", action="store_true", help="A Spot queued resource.")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for every worker.")
  p.add_argument("--max_restarts", type=int, default=20)
  p.add_argument("--poll_s", type=float, default=60.0)
  p.add_argument("--keep", action="store_true", help="Keep the queued resource at the end.")
  p.add_argument(
    "--no_constraints",
    action="store_true",
    help="Install the newest allowed versions, not constraints.txt's.",
  )
  p.add_argument(
    "--num_workers", type=int, default=0, help="Workers per slice (default: from `describe`)."
  )
  p.add_argument("--coordinator", default="", help="Slice 0 worker 0's IP (default: describe).")
  p.add_argument("--dry_run", action="store_true")
  ours, extra = [], []
  if "--" in argv:
    i = argv.index("--")
    ours, extra = argv[:i], argv[i + 1 :]
  else:
    ours = argv
  args = p.parse_args(ours)
  args.extra = extra
  if args.num_slices < 1:
    p.error("--num_slices must be >= 1")
  if args.max_restarts < 0:
    p.error("--max_restarts must be >= 0")
  for kv in args.env:
    if "=" not in kv or not kv.split("=", 1)[0]:
      p.error(f"--env {kv!r}: use KEY=VALUE")
  return args


class Launcher:
  """The gcloud commands for one run; `run` executes one (the tests replace it)."""

  def __init__(self, args, run=None, sleep=time.sleep, out=sys.stdout):
    self.a = args
    self.scope = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    self._run = run or self._subprocess
    self.sleep = sleep
    self.out = out
    self.restarts = 0
    self.dist = os.path.join(ROOT, "build", "tpu_vm_dist")  # where the wheel is built

  # -- commands -------------------------------------------------------------------------------
  @property
  def nodes(self) -> list[str]:
    if self.a.num_slices == 1:
      return [self.a.tpu]
    return [f"{self.a.tpu}-{i}" for i in range(self.a.num_slices)]

  def qr_create(self):
    cmd = [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "create",
      self.a.tpu,
      *self.scope,
      f"--accelerator-type={self.a.accelerator_type}",
      f"--runtime-version={self.a.runtime_version}",
    ]
    if self.a.num_slices == 1:
      cmd.append(f"--node-id={self.a.tpu}")
    else:
      cmd += [f"--node-count={self.a.num_slices}", f"--node-prefix={self.a.tpu}"]
    return cmd + (["--spot"] if self.a.spot else [])

  def qr_state(self):
    return [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "describe",
      self.a.tpu,
      *self.scope,
      "--format=value(state.state)",
    ]

  def qr_delete(self):
    return [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "delete",
      self.a.tpu,
      *self.scope,
      "--force",
      "--quiet",
    ]

  def node_describe(self, node, fmt):
    return [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "describe",
      node,
      *self.scope,
      f"--format=value({fmt})",
    ]

  def ssh(self, node, command):
    return [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      node,
      *self.scope,
      "--worker=all",
      f"--command={command}",
    ]

  def wheel(self, dist):
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, ROOT]

  def scp(self, node, files):
    return [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      *files,
      f"{node}:{REMOTE_DIST}/",
      *self.scope,
      "--worker=all",
    ]

  def install(self, wheel_name):
    constraints = "none" if self.a.no_constraints else f"{REMOTE_DIST}/constraints.txt"
    return (
      f"CONSTRAINTS={constraints} PACKAGE={REMOTE_DIST}/{wheel_name} "
      f"bash {REMOTE_DIST}/install.sh {VENV} tpu"
    )

  def worker_script(self, slice_id: int, workers: int, coordinator: str) -> str:
    """The script every worker of slice `slice_id` runs in the background."""
    a = self.a
    total = (
      workers * a.num_slices if isinstance(workers, int) else f"$(({workers} * {a.num_slices}))"
    )
    env = [
      f"JAX_COORDINATOR_ADDRESS={coordinator}:{PORT}",
      f"JAX_NUM_PROCESSES={total}",
      f"JAX_PROCESS_ID=$(({slice_id} * {workers} + w))",
    ]
    if a.num_slices > 1:
      env += [
        f"MEGASCALE_COORDINATOR_ADDRESS={coordinator}:{MEGASCALE_PORT}",
        f"MEGASCALE_NUM_SLICES={a.num_slices}",
        f"MEGASCALE_SLICE_ID={slice_id}",
        f"MEGASCALE_PORT={MEGASCALE_PORT}",
      ]
    env += [f"{k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in a.env)]
    train = f"{VENV}/bin/python " + shlex.join(
      ["-m", "cwm_jax.train", f"--config={a.config}", f"--workdir={a.workdir}", *a.extra]
    )
    logs = f"{a.workdir.rstrip('/')}/logs"
    if "://" in a.workdir:
      copy = f'gcloud storage cp -q "$log" {shlex.quote(logs)}/worker-$id.log 2>/dev/null'
    else:
      copy = f'mkdir -p {shlex.quote(logs)} && cp "$log" {shlex.quote(logs)}/worker-$id.log'
    return "\n".join(
      [
        "set -uo pipefail",
        f"w={WORKER_ID}",
        f"id=$(({slice_id} * {workers} + w))",
        f"log={REMOTE_RUN}/worker-$id.log status={REMOTE_RUN}/status",
        f"export {' '.join(env)}",
        f"copy_log() {{ {copy}; }}",
        "term=0",
        "on_term() { term=1; kill -TERM $pid 2>/dev/null; }",
        "trap on_term TERM",
        f'{train} > "$log" 2>&1 &',
        "pid=$!",
        'echo "running $pid" > "$status"',
        "( while kill -0 $pid 2>/dev/null; do sleep 60; copy_log; done ) &",
        "while true; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done",
        "copy_log",
        'echo "exit $rc term $term" > "$status"',
      ]
    )

  def start(self, slice_id, workers, coordinator):
    script = self.worker_script(slice_id, workers, coordinator)
    return (
      f"mkdir -p {REMOTE_RUN} && rm -f {REMOTE_RUN}/status && "
      f"echo {shlex.quote(script)} > {REMOTE_RUN}/worker.sh && "
      f"nohup setsid bash {REMOTE_RUN}/worker.sh > /dev/null 2>&1 < /dev/null &"
    )

  # Prints each worker's status: 'running PID', 'exit RC term 0|1', 'lost' (the process is
  # gone without a status: the VM restarted) or 'missing' (never started).
  STATUS = (
    f"s=$(cat {REMOTE_RUN}/status 2>/dev/null || echo missing); "
    "if [[ $s == running* ]] && ! kill -0 ${s#running } 2>/dev/null; then echo lost; "
    'else echo "$s"; fi'
  )

  # -- running ----------------------------------------------------------------------------------
  def _subprocess(self, cmd, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
      raise LaunchError(
        f"{shlex.join(cmd[:6])} ... failed ({out.returncode}): {out.stderr.strip()[-500:]}"
      )
    return out.stdout

  def log(self, msg):
    print(msg, file=self.out, flush=True)

  def run(self, cmd, check=True):
    if self.a.dry_run:
      self.log(shlex.join(cmd))
      return ""
    return self._run(cmd, check)

  def wait_active(self):
    if self.a.dry_run:
      self.log(f"# until ACTIVE, every {self.a.poll_s:g} s:")
      self.run(self.qr_state())
      return
    while True:
      state = self.run(self.qr_state()).strip()
      if state == "ACTIVE":
        return
      if state in ("FAILED", "SUSPENDED"):
        raise LaunchError(f"queued resource {self.a.tpu} is {state}")
      self.sleep(self.a.poll_s)

  def acquire(self):
    if not self.a.accelerator_type:
      return
    self.log("# the queued resource")
    self.run(self.qr_create())
    self.wait_active()

  def topology(self):
    """(workers per slice, slice 0 worker 0's IP)."""
    if self.a.dry_run:
      self.run(self.node_describe(self.nodes[0], "networkEndpoints[].ipAddress"))
      return self.a.num_workers or "$WORKERS", self.a.coordinator or "$WORKER0_IP"
    ips = self.run(self.node_describe(self.nodes[0], "networkEndpoints[].ipAddress"))
    ips = [ip for ip in ips.replace(";", " ").split() if ip]
    if not ips:
      raise LaunchError(f"TPU VM {self.nodes[0]} reports no workers")
    return self.a.num_workers or len(ips), self.a.coordinator or ips[0]

  def deploy(self):
    self.log("# the code: a wheel of this checkout, installed on every worker")
    dist = self.dist
    if not self.a.dry_run:
      os.makedirs(dist, exist_ok=True)
      for f in os.listdir(dist):
        os.remove(os.path.join(dist, f))
    self.run(self.wheel(dist))
    names = [] if self.a.dry_run else [f for f in os.listdir(dist) if f.endswith(".whl")]
    wheel = names[0] if names else "cwm_jax-0.1.0-py3-none-any.whl"
    files = [
      os.path.join(dist, wheel),
      os.path.join(ROOT, "launch", "install.sh"),
      os.path.join(ROOT, "constraints.txt"),
    ]
    for node in self.nodes:
      self.run(self.ssh(node, f"mkdir -p {REMOTE_DIST}"))
      self.run(self.scp(node, files))
      self.run(self.ssh(node, self.install(wheel)))

  def launch(self):
    self.log("# one background training process per worker")
    workers, coordinator = self.topology()
    for i, node in enumerate(self.nodes):
      self.run(self.ssh(node, self.start(i, workers, coordinator)))

  def interrupted(self) -> bool:
    """Whether a slice was lost (preempted, suspended, in maintenance)."""
    if self.a.accelerator_type:
      if self.run(self.qr_state(), check=False).strip() != "ACTIVE":
        return True
    return any(
      self.run(self.node_describe(n, "state"), check=False).strip() != "READY" for n in self.nodes
    )

  def statuses(self) -> list[str]:
    out = []
    for node in self.nodes:
      out += [
        l.strip()
        for l in self.run(self.ssh(node, self.STATUS), check=False).splitlines()
        if l.strip()
      ]
    return out

  def verdict(self):
    """'running', 'finished', 'relaunch' or an exit code to stop with."""
    if self.interrupted():
      return "relaunch"
    statuses = self.statuses()
    if not statuses or any(s in ("lost", "missing") for s in statuses):
      return "relaunch"
    if any(s.startswith("running") for s in statuses):
      return "running"
    codes = [(int(s.split()[1]), s.endswith("term 1")) for s in statuses]
    if all(rc == 0 and not term for rc, term in codes):
      return "finished"
    if any(term for _, term in codes):
      return "relaunch"  # SIGTERM: preemption or maintenance; the trainer saved
    final = [rc for rc, _ in codes if rc in FINAL_CODES]
    return final[0] if final else "relaunch"

  def recover(self):
    """Gets the slices back after a loss: re-creates a lost queued resource."""
    if self.a.accelerator_type:
      state = self.run(self.qr_state(), check=False).strip()
      if state != "ACTIVE":
        if state:
          self.run(self.qr_delete(), check=False)
        self.run(self.qr_create())
        self.wait_active()
        self.deploy()
        return
    while any(
      self.run(self.node_describe(n, "state"), check=False).strip() != "READY" for n in self.nodes
    ):
      self.sleep(self.a.poll_s)

  def supervise(self) -> int:
    if self.a.dry_run:
      self.log(f"# supervise every {self.a.poll_s:g} s: state, then each worker's status")
      if self.a.accelerator_type:
        self.run(self.qr_state())
      for n in self.nodes:
        self.run(self.node_describe(n, "state"))
        self.run(self.ssh(n, self.STATUS))
      self.log(
        "# relaunch (from the queued resource on when it was lost) after preemption, "
        f"maintenance or SIGTERM, at most {self.a.max_restarts} times; stop when every "
        "worker exited 0"
      )
      return 0
    while True:
      self.sleep(self.a.poll_s)
      verdict = self.verdict()
      if verdict == "running":
        continue
      if verdict == "finished":
        self.log(f"finished; logs in {self.a.workdir.rstrip('/')}/logs/")
        return 0
      if isinstance(verdict, int):
        self.log(f"a worker exited {verdict}; not relaunching (see the worker logs)")
        return verdict
      if self.restarts >= self.a.max_restarts:
        self.log(f"interrupted again after {self.restarts} relaunches; giving up")
        return 1
      self.restarts += 1
      self.log(f"relaunch {self.restarts}/{self.a.max_restarts}: resuming from {self.a.workdir}")
      self.recover()
      self.launch()

  def main(self) -> int:
    try:
      self.acquire()
      self.deploy()
      self.launch()
      return self.supervise()
    finally:
      if self.a.accelerator_type and not self.a.keep:
        self.log("# release the queued resource")
        self.run(self.qr_delete(), check=False)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return Launcher(args).main()
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
