"""Renders docs/performance.md's tables from the latest benchmark records.

  python benchmarks/tables.py            # rewrite the generated blocks of docs/performance.md
  python benchmarks/tables.py --check    # exit 1 if the committed file differs from its output

Each generated block sits between `<!-- tables:NAME -->` and `<!-- /tables:NAME -->` in the
doc and is rendered from the newest record under `benchmarks/results/NAME/`
(`results_io.latest(NAME)["result"]`, what `python benchmarks/NAME.py --save` wrote), followed
by a line naming that record: its file, date, commit and machine. Everything outside the
markers is left as written. A marker without a renderer or without a record is an error, so
every generated figure has one home: its record.
"""

import argparse
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "performance.md")
BLOCK = re.compile(r"(<!-- tables:(\w+) -->\n)(.*?)(<!-- /tables:\2 -->)", re.S)


def _load_results_io():
  """benchmarks/results_io.py by path: this file is also loaded by path (the tests), and
  benchmarks/ on sys.path would shadow modules such as `tables` for everything after."""
  spec = importlib.util.spec_from_file_location("results_io", os.path.join(HERE, "results_io.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


results_io = _load_results_io()
RESULTS = results_io.RESULTS


def _mb(n: float) -> str:
  return f"{n / 1e6:,.0f}"


def attention_memory(r: dict) -> str:
  """Compiled temporaries of the chunked and dense train steps at each T, and per token."""
  rows = ["| T | chunked temp (MB) | per token (kB) | dense temp (MB) |", "|---|---|---|---|"]
  dense = r.get("dense_temp_bytes", {})
  for t, b in sorted(r["chunked_temp_bytes"].items(), key=lambda kv: int(kv[0])):
    d = _mb(dense[t]) if t in dense else ""
    rows.append(f"| {int(t):,} | {_mb(b)} | {b / int(t) / 1e3:,.1f} | {d} |")
  dense_exponent = r.get("dense_growth_exponent")
  dense_text = f" (dense {dense_exponent})" if dense_exponent is not None else ""
  return (
    f"Model: {r['model']}. `growth_exponent` {r['growth_exponent']}{dense_text}.\n\n"
    + "\n".join(rows)
    + "\n"
  )


def checkpoint_io(r: dict) -> str:
  """Save / restore rates per target and the train step with an async save in flight."""
  rows = [
    "| target | save MB/s | restore MB/s | step time, save in flight / none | "
    "blocking part of a save (s) | restored equal |",
    "|---|---|---|---|---|---|",
  ]
  flight = r["train"]["save_in_flight"]
  for target in sorted(r["io"], key=lambda t: (t != "local", t)):  # records sort their keys
    io, f = r["io"][target], flight.get(target, {})
    rows.append(
      f"| {target} | {io['save_mb_s']} | {io['restore_mb_s']} | "
      f"{f.get('step_time_ratio', '')}x | {f.get('save_blocking_s', '')} | "
      f"{io['restored_equal']} |"
    )
  return (
    f"State {r['state_mb']} MB ({r['model']['params']:,} parameters with AdamW), "
    f"{r['cpu_count']} CPU cores, {r['io_rounds']} rounds.\n\n" + "\n".join(rows) + "\n"
  )


def traces(r: dict) -> str:
  """Sandboxed trace throughput, the traces' sizes and the sandbox's fixed cost."""
  statuses = ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items()))
  rows = [
    "| calls (statuses) | traces/s | seconds | frames mean / max | trace bytes mean | "
    "empty `run_python` (s) | namespaces |",
    "|---|---|---|---|---|---|---|",
    f"| {r['calls']} ({statuses}) | {r['traces_per_s']} | {r['seconds']} | "
    f"{r['frames_mean']} / {r['frames_max']} | {r['trace_bytes_mean']:,} | "
    f"{r['run_python_empty_s']} | {r['namespaces']} |",
  ]
  return "\n".join(rows) + "\n"


RENDERERS = {"attention_memory": attention_memory, "checkpoint_io": checkpoint_io, "traces": traces}


def source_line(name: str, rec: dict) -> str:
  """Where a block's figures come from: the record's file, date, commit and machine."""
  path = f"benchmarks/results/{name}/{rec['date'].replace(':', '')}.json"
  commit = (rec.get("commit") or "unknown")[:10]
  machine = rec.get("machine")
  if machine:
    accelerator = f", {machine['accelerator']}" if machine.get("accelerator") else ""
    host = f"{machine['cpu']}, {machine['cpu_count']} cores{accelerator}"
  else:
    host = "not recorded"
  dirty = " (with uncommitted changes)" if rec.get("dirty") else ""
  line = f"Source: `{path}`, {rec['date']}, commit `{commit}`{dirty}; machine: {host}."
  if rec.get("migrated_from"):
    line += f" Migrated from `{rec['migrated_from']}` (date and commit: the commit that added it)."
  return line + "\n"


def render(text: str, results: str = RESULTS) -> str:
  """`text` with every generated block rendered afresh from its newest record."""

  def block(m):
    name = m.group(2)
    if name not in RENDERERS:
      raise ValueError(f"tables:{name} has no renderer in benchmarks/tables.py")
    try:
      rec = results_io.latest(name, results)
    except FileNotFoundError as e:
      raise ValueError(f"tables:{name} needs a record: {e}") from None
    body = RENDERERS[name](rec["result"])
    return m.group(1) + body + "\n" + source_line(name, rec) + m.group(4)

  return BLOCK.sub(block, text)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare, do not write")
  args = parser.parse_args()
  with open(DOC) as f:
    text = f.read()
  out = render(text)
  if args.check:
    if out != text:
      print(f"{DOC} differs from `python benchmarks/tables.py`", file=sys.stderr)
      return 1
    return 0
  with open(DOC, "w") as f:
    f.write(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
