"""Metric sinks: `DIR/metrics.jsonl`, TensorBoard events, a progress line.

Only the writer of process 0 is enabled; the others drop everything.
"""

from __future__ import annotations

import json
import os

from absl import logging


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               total_steps: int | None = None):
    self.enabled, self.total = enabled, total_steps
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step` (logged after the checkpoint we resume from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"train/{k}", float(v), step)
    logging.info("%s", progress_line(record, self.total) if "loss" in record
                 else eval_line(record))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def eval_line(r: dict) -> str:
  """'eval step 10 | trace_nll 1.2345 | ...' for an evaluation record."""
  items = [f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(r.items()) if k != "step"]
  return " | ".join([f"eval step {r['step']}"] + items)


def progress_line(r: dict, total: int | None = None) -> str:
  """'step 10/20 | loss 5.1234 | grad 0.812 | lr 3.0e-03 | 12,345 tok/s | 41.0 ms | MFU 1.2%'."""
  parts = [f"step {r['step']}" + (f"/{total}" if total else ""), f"loss {r['loss']:.4f}",
           f"grad {r.get('grad_norm', 0):.3f}", f"lr {r.get('lr', 0):.1e}"]
  if "tokens_per_sec" in r:
    parts += [f"{r['tokens_per_sec']:,.0f} tok/s", f"{1e3 * r['step_time']:.1f} ms"]
  if r.get("mfu"):
    parts.append(f"MFU {100 * r['mfu']:.2f}%")
  if r.get("bad_records"):
    parts.append(f"bad records {int(r['bad_records']):,}")
  if r.get("nonfinite_steps"):
    parts.append(f"non-finite steps {int(r['nonfinite_steps'])}")
  return " | ".join(parts)
