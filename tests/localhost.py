"""Several JAX processes on this machine forming one job (gloo collectives on localhost),
as tests and benchmarks start them: each process's environment, and a run that waits for
all of them and fails with the log of the first that failed."""

import os
import subprocess
import sys

from gcs_emulator import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(process_id: int, processes: int, port: int, devices: int) -> dict:
  """Process `process_id` of `processes` with `devices` simulated CPU devices; the
  coordinator (process 0) listens on 127.0.0.1:`port`. One process gets no coordinator."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  if processes > 1:
    env.update(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(processes),
      JAX_PROCESS_ID=str(process_id),
    )
  return env


def run(argv: list[str], processes: int, devices: int, timeout: float) -> list[str]:
  """Runs `python argv...` as `processes` processes of one job; returns their logs (stdout
  and stderr). Raises RuntimeError naming the first process that exited non-zero."""
  port = free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, *argv],
      env=process_env(i, processes, port, devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    if p.returncode:
      raise RuntimeError(f"process {i} of {processes} exited {p.returncode}:\n{log[-4000:]}")
  return logs
