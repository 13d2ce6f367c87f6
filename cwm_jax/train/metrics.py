"""Metric sinks: `DIR/metrics.jsonl`, TensorBoard events, a progress line.

Only the writer of process 0 is enabled; the others drop everything.

On a local disk each record is appended as it is logged. An object store cannot
append, so for a URL workdir (`gs://...`) the writer keeps the run's records and
rewrites the whole `metrics.jsonl` object (a store replaces an object atomically:
readers see the previous version or the new one), and TensorBoard events are
written to a local folder whose files are uploaded over their objects. Both
happen at `flush()`: before every checkpoint save (so a resumed run never lacks
the records up to its checkpoint), every `flush_every_s` seconds, and at close.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

from absl import logging

from cwm_jax import storage


class MetricsWriter:
  """Writes one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               total_steps: int | None = None, flush_every_s: float = 60.0):
    self.enabled, self.total = enabled, total_steps
    self.path = storage.join(workdir, "metrics.jsonl")
    self._remote = storage.is_url(workdir)
    self._lines: list[str] = []  # a URL workdir's whole file, rewritten at flush
    self._dirty, self._flushed_at, self._flush_every_s = False, time.monotonic(), flush_every_s
    self._tb = self._tb_local = None
    if enabled:
      storage.makedirs(workdir)
      if self._remote and storage.exists(self.path):
        self._lines = storage.read_text(self.path).splitlines(keepends=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb_dir = storage.join(workdir, "tensorboard")
        if self._remote:
          self._tb_local = tempfile.mkdtemp(prefix="cwm-tensorboard-")
        self._tb = SummaryWriter(self._tb_local or self._tb_dir)

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step` (logged after the checkpoint we resume from)."""
    if not self.enabled:
      return
    if self._remote:
      kept = [l for l in self._lines if l.strip() and json.loads(l)["step"] <= step]
      if kept != self._lines:
        self._lines, self._dirty = kept, True
        self.flush()
      return
    if not storage.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    storage.write_text(self.path, "".join(kept))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      self._dirty = True
    else:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"train/{k}", float(v), step)
    logging.info("%s", progress_line(record, self.total) if "loss" in record
                 else eval_line(record))
    if self._remote and time.monotonic() - self._flushed_at >= self._flush_every_s:
      self.flush()

  def flush(self) -> None:
    """Makes everything logged so far durable in the workdir."""
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
      if self._tb_local is not None:
        storage.upload_tree(self._tb_local, self._tb_dir)
    if self._remote and self._dirty:
      storage.write_text(self.path, "".join(self._lines))
      self._dirty = False
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      if self._tb_local is not None:
        storage.upload_tree(self._tb_local, self._tb_dir)
      self._tb = None
    self.flush()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)


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
