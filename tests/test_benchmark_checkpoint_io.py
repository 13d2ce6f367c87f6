"""benchmarks/checkpoint_io.py on a tiny model: one JSON object with every field, and the
checkpoints it saved (local and on its own GCS emulator, sync and async) restore equal.
No timing is asserted."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--dim",
  "64",
  "--layers",
  "2",
  "--heads",
  "4",
  "--kv_heads",
  "2",
  "--head_dim",
  "16",
  "--ffn",
  "128",
  "--vocab",
  "256",
  "--seq",
  "32",
  "--io_rounds",
  "1",
  "--step_rounds",
  "1",
  "--steps",
  "1",
]


def test_checkpoint_io_benchmark_tiny():
  # Its own process: the script starts its own emulator and must name it before any GCS
  # client is imported, which this test process has done already (conftest).
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
  }
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "checkpoint_io.py"), *TINY],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout[-2000:]
  r = json.loads(lines[0])
  assert r["benchmark"] == "checkpoint_io" and r["restored_equal"] is True
  assert r["state_bytes"] > 0 and r["model"]["params"] > 0
  for target in ("local", "gcs"):
    io = r["io"][target]
    assert io["restored_equal"] is True and io["bytes_written"] > 0
    assert io["save_mb_s"] > 0 and io["restore_mb_s"] > 0
    assert len(io["save_mb_s_rounds"]) == len(io["restore_mb_s_rounds"]) == 1
    flight = r["train"]["save_in_flight"][target]
    assert flight["async_restored_equal"] is True
    assert 0 <= flight["save_blocking_s"] <= flight["save_total_s"]
    assert flight["step_s"] > 0 and flight["step_time_ratio"] > 0
  train = r["train"]
  assert train["step_s_no_save"] > 0 and train["flops_per_step"] > 0
  assert train["matmul_gflop_per_s"] > 0 and train["fraction_of_matmul_rate"] > 0
  assert len(r["load_avg"]["start"]) == 3
