"""Report: `python -m cwm_jax.report WORKDIR` renders WORKDIR/report/index.html.

A self-contained page (PNG plots beside it) of a run or a stage schedule, read from
the workdir's own files (local or gs://): loss, learning rate, gradient norm,
throughput, MFU, goodput and memory across stages, the in-training evaluation
metrics, each stage's goodput summary (goodput.json), and the final model's trace
prediction side by side with the interpreter's trace (finish.json). Needs the
`report` extra (matplotlib).
"""

from __future__ import annotations

import html
import io
import json

from absl import app, flags

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.cli import run_main

FLAGS = flags.FLAGS
_OUT = flags.DEFINE_string("report_dir", "", "Where to write the page (default: WORKDIR/report).")

# Plotted series: (file name, title, record keys, y scale).
PLOTS = (
  ("loss", "training loss", ("loss",), "linear"),
  ("lr", "learning rate", ("lr",), "linear"),
  ("grad_norm", "gradient norm", ("grad_norm",), "linear"),
  ("throughput", "tokens / s", ("tokens_per_sec",), "linear"),
  ("mfu", "model FLOPs utilisation", ("mfu",), "linear"),
  ("goodput", "goodput (productive share of each interval)", ("goodput/fraction",), "linear"),
  (
    "memory",
    "memory (bytes)",
    (
      "memory/host_rss_bytes",
      "memory/live_array_bytes",
      "memory/device_bytes_in_use",
      "memory/device_peak_bytes",
    ),
    "log",
  ),
)
_ORDER = ("pretrain", "midtrain", "sft", "rl")


def _records(path: str) -> list[dict]:
  out = []
  for line in storage.read_text(path).splitlines():
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a torn last line of a local file written while the run was killed
  return out


def stages(workdir: str) -> list[tuple[str, str]]:
  """(name, folder) of every run in the workdir: its schedule stages in recipe order, or
  the workdir itself for a single run."""
  if storage.isfile(storage.join(workdir, "metrics.jsonl")):
    return [("run", workdir)]
  names = [
    n for n in storage.listdir(workdir) if storage.isfile(storage.join(workdir, n, "metrics.jsonl"))
  ]
  names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
  return [(n, storage.join(workdir, n)) for n in names]


def series(runs: list[tuple[str, list[dict]]]) -> dict[str, list[tuple[list, dict]]]:
  """Per stage: x positions (steps laid end to end across stages: a stage whose steps
  restart continues after the previous one) and {key: values} of its training records."""
  out, offset = {}, 0
  for name, records in runs:
    train = [r for r in records if "loss" in r]
    if not train:
      continue
    first = train[0]["step"]
    shift = offset - first + 1 if first <= offset else 0
    xs = [r["step"] + shift for r in train]
    keys = {k for r in train for k in r}
    out[name] = (xs, {k: [r.get(k) for r in train] for k in keys})
    offset = xs[-1]
  return out


def _png(title: str, lines: list[tuple[str, list, list]], yscale: str) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
  for label, xs, ys in lines:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and (yscale != "log" or y > 0)]
    if pts:
      ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 40 else None)
  ax.set_title(title)
  ax.set_xlabel("step (stages laid end to end)")
  ax.set_yscale(yscale)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return buf.getvalue()


def render(workdir: str, out: str = "") -> str:
  """Writes index.html and its PNGs into `out` (default WORKDIR/report); returns the page."""
  try:
    import matplotlib  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError:
    raise ConfigError("the report needs matplotlib: pip install 'cwm_jax[report]'") from None
  found = stages(workdir)
  if not found:
    raise ConfigError(
      f"{workdir}: no metrics.jsonl here or in its stage folders; pass a training workdir"
    )
  out = out or storage.join(workdir, "report")
  runs = [(name, _records(storage.join(folder, "metrics.jsonl"))) for name, folder in found]
  by_stage = series(runs)
  body = [
    f"<h1>cwm_jax run: {html.escape(workdir)}</h1>",
    "<p>Stages: " + ", ".join(f"{html.escape(n)} ({len(r)} records)" for n, r in runs) + "</p>",
  ]
  for fname, title, keys, yscale in PLOTS:
    lines = [
      (name if len(keys) == 1 else f"{name} {k.split('/')[-1]}", xs, vals[k])
      for name, (xs, vals) in by_stage.items()
      for k in keys
      if k in vals
    ]
    if not lines:
      continue
    storage.write_bytes(storage.join(out, f"{fname}.png"), _png(title, lines, yscale))
    body.append(f'<h2>{html.escape(title)}</h2><img src="{fname}.png" alt="{fname}">')
  body += _eval_section(runs, out) + _goodput_section(found) + _trace_section(workdir)
  page = (
    "<!doctype html><html><head><meta charset='utf-8'><title>cwm_jax report</title>"
    "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style></head><body>"
    + "\n".join(body)
    + "</body></html>\n"
  )
  storage.write_text(storage.join(out, "index.html"), page)
  return page


def _eval_section(runs, out: str) -> list[str]:
  evals = [
    (name, [r for r in records if any(k.startswith("eval/") for k in r)]) for name, records in runs
  ]
  keys = sorted({k for _, rs in evals for r in rs for k in r if k.startswith("eval/")})
  if not keys:
    return []
  lines = [
    (
      f"{name} {k.removeprefix('eval/')}",
      [r["step"] for r in rs if k in r],
      [r[k] for r in rs if k in r],
    )
    for name, rs in evals
    for k in keys
  ]
  storage.write_bytes(
    storage.join(out, "eval.png"), _png("in-training evaluation", lines, "linear")
  )
  return ['<h2>in-training evaluation</h2><img src="eval.png" alt="eval">']


def _goodput_section(found) -> list[str]:
  rows = []
  for name, folder in found:
    path = storage.join(folder, "goodput.json")
    if not storage.isfile(path):
      continue
    s = storage.read_json(path)["summary"]
    cells = "".join(f"<td>{v:.1f}</td>" for v in s["buckets"].values())
    rows.append(
      f"<tr><td>{html.escape(name)}</td><td>{s['launches']}</td>"
      f"<td>{100 * s['goodput']:.1f}%</td><td>{s['wall_s']:.1f}</td>{cells}"
      f"<td>{s['lost_s']:.1f}</td></tr>"
    )
    head = "".join(f"<th>{k} s</th>" for k in s["buckets"])
  if not rows:
    return []
  return [
    "<h2>goodput</h2><table><tr><th>stage</th><th>launches</th><th>goodput</th>"
    f"<th>wall s</th>{head}<th>lost s</th></tr>",
    *rows,
    "</table>",
  ]


def _trace_section(workdir: str) -> list[str]:
  path = storage.join(workdir, "finish.json")
  if not storage.isfile(path):
    return []
  sample = storage.read_json(path).get("sample", {})
  if "side_by_side" not in sample:
    return []
  return [
    f"<h2>trace prediction of {html.escape(sample.get('call', ''))}</h2>",
    f"<pre>{html.escape(sample.get('program', ''))}</pre>",
    f"<pre>{html.escape(sample['side_by_side'])}</pre>",
    f"<p>{sample.get('frames_matched', 0)} of {sample.get('real_frames', 0)} frames "
    "match the interpreter's.</p>",
  ]


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("give exactly one WORKDIR", exitcode=2)
  out = _OUT.value or storage.join(argv[1], "report")
  render(argv[1], out)
  print(storage.join(out, "index.html"))


def run():
  run_main(main)


if __name__ == "__main__":
  run()
