"""Renders docs/performance.md's tables from the results under benchmarks/results/.

  python benchmarks/tables.py            # rewrite the generated blocks of docs/performance.md
  python benchmarks/tables.py --check    # exit 1 if the committed file differs from its output

Each generated block sits between `<!-- tables:NAME -->` and `<!-- /tables:NAME -->` in the
doc and is rendered from `benchmarks/results/NAME.json` (what `python benchmarks/NAME.py`
prints). Everything outside the markers is left as written. A marker whose results file or
renderer is missing is an error, so every generated figure has one home: its results file.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOC = os.path.join(ROOT, "docs", "performance.md")
BLOCK = re.compile(r"(<!-- tables:(\w+) -->\n)(.*?)(<!-- /tables:\2 -->)", re.S)


def _mb(n: float) -> str:
  return f"{n / 1e6:,.0f}"


def attention_memory(r: dict) -> str:
  """Compiled temporaries of the chunked and dense train steps at each T, and per token."""
  rows = ["| T | chunked temp (MB) | per token (kB) | dense temp (MB) |", "|---|---|---|---|"]
  dense = r.get("dense_temp_bytes", {})
  for t, b in sorted(r["chunked_temp_bytes"].items(), key=lambda kv: int(kv[0])):
    d = _mb(dense[t]) if t in dense else ""
    rows.append(f"| {int(t):,} | {_mb(b)} | {b / int(t) / 1e3:,.1f} | {d} |")
  return (
    f"Model: {r['model']}. `growth_exponent` {r['growth_exponent']} "
    f"(dense {r['dense_growth_exponent']}).\n\n" + "\n".join(rows) + "\n"
  )


def checkpoint_io(r: dict) -> str:
  """Save / restore rates per target and the train step with an async save in flight."""
  rows = [
    "| target | save MB/s | restore MB/s | step time, save in flight / none | "
    "blocking part of a save (s) | restored equal |",
    "|---|---|---|---|---|---|",
  ]
  flight = r["train"]["save_in_flight"]
  for target, io in r["io"].items():
    f = flight.get(target, {})
    rows.append(
      f"| {target} | {io['save_mb_s']} | {io['restore_mb_s']} | "
      f"{f.get('step_time_ratio', '')}x | {f.get('save_blocking_s', '')} | "
      f"{io['restored_equal']} |"
    )
  return (
    f"State {r['state_mb']} MB ({r['model']['params']:,} parameters with AdamW), "
    f"{r['cpu_count']} CPU cores, {r['io_rounds']} rounds.\n\n" + "\n".join(rows) + "\n"
  )


RENDERERS = {"attention_memory": attention_memory, "checkpoint_io": checkpoint_io}


def render(text: str, results: str = RESULTS) -> str:
  """`text` with every generated block rendered afresh from its results file."""

  def block(m):
    name = m.group(2)
    path = os.path.join(results, f"{name}.json")
    if name not in RENDERERS or not os.path.exists(path):
      raise ValueError(f"tables:{name} needs a renderer and {path}")
    with open(path) as f:
      return m.group(1) + RENDERERS[name](json.load(f)) + m.group(4)

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
