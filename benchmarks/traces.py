"""Trace throughput of the sandboxed tracer; prints one JSON object.

  python benchmarks/traces.py [N_CALLS]

Traces the first N_CALLS (default: all) calls of the shipped programs followed by the
statistics/difflib/textwrap doctest calls, one after another, and times an empty
`run_python` (the sandbox's fixed cost: namespaces, process start, limits, network block).
`namespaces` says whether the runs were isolated in namespaces (see --sandbox_info).
"""

import collections
import json
import sys
import time

from cwm_jax.data import traces
from cwm_jax.data.traces import isolation


def main(n_calls=None):
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
  print(
    json.dumps(
      {
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
    )
  )


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
