"""Where benchmark results live: `benchmarks/results/<name>/<UTC timestamp>.json`.

Every benchmark prints one JSON object and, with `--save`, also writes it here through
`save(name, result)`, wrapped with what makes a figure traceable: the date, the machine (CPU
model, core count, accelerator), the commit and the versions of the stack. `latest(name)` is
what `benchmarks/tables.py` renders into docs/performance.md, so each figure has one home.

  {"name": ..., "date": "2026-12-07T01:02:03Z", "machine": {...}, "commit": "abc123...",
   "dirty": false, "versions": {"jax": ...}, "result": {...the benchmark's own JSON...}}

A record may carry more top-level fields: what its result was computed from (`tpu_plan.py`
keeps the raw plans it summarized under "plans"), or, for a result measured before this
layout existed, "migrated_from": the flat file that held it, with `machine` and `versions`
null (not recorded then) and `date` / `commit` those of the commit that added that file.
"""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PACKAGES = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def _git(*args: str) -> str:
  try:
    out = subprocess.run(
      ["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return ""
  return out.stdout.strip()


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine() -> dict:
  """The host a figure was measured on; `accelerator` only when jax is already imported
  (asking jax here would initialise a backend the benchmark may have configured)."""
  info = {
    "cpu": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "system": platform.platform(),
  }
  import sys

  if "jax" in sys.modules:
    devices = sys.modules["jax"].devices()
    info["accelerator"] = f"{len(devices)} x {devices[0].device_kind}"
  return info


def record(name: str, result: dict, extra: dict | None = None) -> dict:
  """`result` wrapped with date, machine, commit and versions (and the fields of `extra`)."""
  commit = _git("rev-parse", "HEAD")
  clash = sorted(set(extra or {}) & {"name", "date", "machine", "commit", "dirty", "versions"})
  if clash or "result" in (extra or {}):
    raise ValueError(f"extra fields may not replace the record's own: {clash or ['result']}")
  return {
    **(extra or {}),
    "name": name,
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "machine": machine(),
    "commit": commit,
    "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
    "versions": _versions(),
    "result": result,
  }


def save(name: str, result: dict, results_dir: str = RESULTS, extra: dict | None = None) -> str:
  """Writes `record(name, result, extra)` to `<results_dir>/<name>/<timestamp>.json`; returns
  the path."""
  return write(record(name, result, extra), results_dir)


def write(rec: dict, results_dir: str = RESULTS) -> str:
  """Writes the record `rec` to `<results_dir>/<its name>/<its date>.json`; returns the path.
  Never replaces a record: two of one name need different dates."""
  folder = os.path.join(results_dir, rec["name"])
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, rec["date"].replace(":", "") + ".json")
  with open(path, "x") as f:
    json.dump(rec, f, indent=1, sort_keys=True)
    f.write("\n")
  return path


def latest(name: str, results_dir: str = RESULTS) -> dict:
  """The newest saved record of benchmark `name` (FileNotFoundError names the command)."""
  paths = sorted(glob.glob(os.path.join(results_dir, name, "*.json")))
  if not paths:
    raise FileNotFoundError(
      f"no results for {name!r} under {results_dir}; run `python benchmarks/{name}.py --save`"
    )
  with open(paths[-1]) as f:
    return json.load(f)
