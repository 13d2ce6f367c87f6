"""Trace throughput of the sandboxed tracer; prints one JSON object.

  python benchmarks/traces.py [N_CALLS] [--cgroup MODE] [--compare ROUNDS] [--save]

Traces the first N_CALLS (default: all) calls of the shipped programs followed by the
statistics/difflib/textwrap doctest calls, one after another, and times an empty
`run_python` (the sandbox's fixed cost: namespaces, process start, limits, network block,
the run's cgroup). `namespaces` says whether the runs were isolated in namespaces (see
--sandbox_info); `cgroup` which per-run cgroup they had (`Limits.cgroup` = --cgroup, default
auto: v2, v1 or none). `--compare ROUNDS` measures --cgroup against `off` side by side:
ROUNDS rounds, each both modes in alternating order (so drift on a shared machine hits both
alike); the top-level figures are then --cgroup's median round and `side_by_side` holds every
round and the ratio of the medians. `--save` also writes the JSON under
benchmarks/results/traces/ (`results_io`).
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.data import traces
from cwm_jax.data.traces import cgroups, isolation


def measure(n_calls=None, cgroup="auto") -> dict:
  limits = traces.Limits(cgroup=cgroup)
  calls = traces.program_calls()
  for module in traces.DOCTEST_MODULES:
    calls += traces.doctest_calls(module)
  calls = calls[:n_calls]
  start = time.perf_counter()
  statuses, frames, text_bytes = collections.Counter(), [], []
  for call in calls:
    result = traces.trace_call(call.source, call.function, call.args, call.kwargs, limits=limits)
    statuses[result.status] += 1
    if result.status == "ok":
      frames.append(len(result.frames))
      text_bytes.append(
        len(traces.format_trace(call.source, call.function, result.frames).encode())
      )
  elapsed = time.perf_counter() - start
  empty = time.perf_counter()
  for _ in range(5):
    traces.run_python("pass", limits=limits)
  empty = (time.perf_counter() - empty) / 5
  used = cgroups.resolve(cgroup)
  return {
    "calls": len(calls),
    "statuses": dict(statuses),
    "seconds": round(elapsed, 2),
    "traces_per_s": round(len(calls) / elapsed, 2),
    "frames_mean": round(sum(frames) / max(len(frames), 1), 1),
    "frames_max": max(frames),
    "trace_bytes_mean": round(sum(text_bytes) / max(len(text_bytes), 1)),
    "run_python_empty_s": round(empty, 4),
    "namespaces": isolation.probe().namespaces,
    "cgroup": f"v{used.version}" if used else "none",
  }


def compare(n_calls, cgroup: str, rounds: int) -> dict:
  """--cgroup against 'off', alternating which goes first; the median round of --cgroup with
  `side_by_side` (every round's traces/s and empty-run seconds, the ratio of the medians)."""
  runs = {cgroup: [], "off": []}
  for i in range(rounds):
    for mode in (cgroup, "off") if i % 2 else ("off", cgroup):
      runs[mode].append(measure(n_calls, mode))
  side = {}
  for mode, results in runs.items():
    rates = [r["traces_per_s"] for r in results]
    side[mode] = {
      "cgroup": results[0]["cgroup"],
      "traces_per_s": rates,
      "traces_per_s_median": statistics.median(rates),
      "run_python_empty_s": [r["run_python_empty_s"] for r in results],
      "run_python_empty_s_median": statistics.median(r["run_python_empty_s"] for r in results),
    }
  side["rounds"] = rounds
  side["ratio_traces_per_s"] = round(
    side[cgroup]["traces_per_s_median"] / side["off"]["traces_per_s_median"], 3
  )
  ordered = sorted(runs[cgroup], key=lambda r: r["traces_per_s"])
  return dict(ordered[(len(ordered) - 1) // 2], side_by_side=side)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("n_calls", nargs="?", type=int, default=None, help="calls (default: all)")
  parser.add_argument("--cgroup", default="auto", choices=cgroups.MODES, help="Limits.cgroup")
  parser.add_argument(
    "--compare", type=int, default=0, metavar="ROUNDS", help="side by side with --cgroup off"
  )
  parser.add_argument("--save", action="store_true", help="also write benchmarks/results/traces/")
  args = parser.parse_args()
  if args.compare and args.cgroup == "off":
    parser.error("--compare measures --cgroup against off: give another --cgroup")
  if args.compare:
    result = compare(args.n_calls, args.cgroup, args.compare)
  else:
    result = measure(args.n_calls, args.cgroup)
  print(json.dumps(result))
  if args.save:
    print("saved", results_io.save("traces", result), file=sys.stderr)


if __name__ == "__main__":
  main()
