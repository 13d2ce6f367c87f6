"""Trace throughput of the sandboxed tracer; prints one JSON object.

  python benchmarks/traces.py [N_CALLS] [--save]

Traces the first N_CALLS (default: all) calls of the shipped programs followed by the
statistics/difflib/textwrap doctest calls, one after another, and times an empty
`run_python` (the sandbox's fixed cost: namespaces, process start, limits, network block).
`namespaces` says whether the runs were isolated in namespaces (see --sandbox_info).
`--save` also writes the JSON under benchmarks/results/traces/ (`results_io`).
"""

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.data import traces
from cwm_jax.data.traces import isolation


def measure(n_calls=None) -> dict:
  calls = traces.program_calls()
  for module in traces.DOCTEST_MODULES:
    calls += traces.doctest_calls(module)
  calls = calls[:n_calls]
  start = time.perf_counter()
  statuses, frames, text_bytes = collections.Counter(), [], []
  for call in calls:
    result = traces.trace_call(call.source, call.function, call.args, call.kwargs)
    statuses[result.status] += 1
    if result.status == "ok":
      frames.append(len(result.frames))
      text_bytes.append(
        len(traces.format_trace(call.source, call.function, result.frames).encode())
      )
  elapsed = time.perf_counter() - start
  empty = time.perf_counter()
  for _ in range(5):
    traces.run_python("pass")
  empty = (time.perf_counter() - empty) / 5
  return {
    "calls": len(calls),
    "statuses": dict(statuses),
    "seconds": round(elapsed, 2),
    "traces_per_s": round(len(calls) / elapsed, 2),
    "frames_mean": round(sum(frames) / max(len(frames), 1), 1),
    "frames_max": max(frames),
    "trace_bytes_mean": round(sum(text_bytes) / max(len(text_bytes), 1)),
    "run_python_empty_s": round(empty, 3),
    "namespaces": isolation.probe().namespaces,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("n_calls", nargs="?", type=int, default=None, help="calls (default: all)")
  parser.add_argument("--save", action="store_true", help="also write benchmarks/results/traces/")
  args = parser.parse_args()
  result = measure(args.n_calls)
  print(json.dumps(result))
  if args.save:
    print("saved", results_io.save("traces", result), file=sys.stderr)


if __name__ == "__main__":
  main()
