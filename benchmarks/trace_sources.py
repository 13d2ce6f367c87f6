"""Trace-corpus build throughput and drop table for both sources; prints one JSON object.

  python benchmarks/trace_sources.py [--workers 2] [--runner local|DirectRunner]
      [--stdlib_tests test_bisect,...] [--limit_calls N] [--save]

Builds `functions` (the shipped programs, held-out ones skipped, plus the literal doctest calls
of statistics/difflib/textwrap/fractions) and `repo_traces` (standard-library test modules under
pytest) into a temporary folder, and reports per source: work items, traced calls, seconds,
traces/s, traces/s per worker (one worker per core), the kept fraction and the fraction dropped
by reason (timeout, memory, output_limit, too_long, error, duplicate, contaminated). `--save`
also writes the JSON under benchmarks/results/trace_sources/ (`results_io`).
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.data import corpus_build, repo_traces


def _row(manifest: dict) -> dict:
  n = max(manifest["candidates"], 1)
  return {
    "items": manifest["items"],
    "traced_calls": manifest["candidates"],
    "records": manifest["records"],
    "seconds": manifest["seconds"],
    "traces_per_s": manifest["traces_per_s"],
    "traces_per_s_per_worker": manifest["traces_per_s_per_worker"],
    "kept_fraction": round(manifest["kept"] / n, 4),
    "dropped_fraction": {r: round(c / n, 4) for r, c in manifest["dropped"].items()},
    "dropped": manifest["dropped"],
    "not_traced": manifest["not_traced"],
    "tests": manifest["tests"],
    "sessions_failed": manifest["sessions_failed"],
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--runner", default="local")
  parser.add_argument("--stdlib_tests", default=",".join(repo_traces.STDLIB_EXAMPLE))
  parser.add_argument("--limit_calls", type=int, default=None)
  parser.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  args = parser.parse_args()
  cfg = corpus_build.TraceBuildConfig(workers=args.workers, runner=args.runner, progress=True)
  out = {"workers": args.workers, "runner": args.runner, "cpus": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    sources = {
      "functions": {"limit": args.limit_calls},
      "repo_traces": {"stdlib_tests": args.stdlib_tests.split(",")},
    }
    for name, kwargs in sources.items():
      manifest = corpus_build.build_corpus(name, os.path.join(tmp, name), config=cfg, **kwargs)
      out[name] = _row(manifest)
  print(json.dumps(out))
  if args.save:
    print("saved", results_io.save("trace_sources", out), file=sys.stderr)


if __name__ == "__main__":
  main()
