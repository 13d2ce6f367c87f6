"""Metric sinks (trackers): `DIR/metrics.jsonl`, TensorBoard events, wandb, a progress line.

Only the writer of process 0 is enabled; the others drop everything. Every record goes
to every tracker the config chooses: metrics.jsonl always (resume truncates it to the
checkpoint it restores), TensorBoard with `metrics.tensorboard`, wandb with
`metrics.wandb_project` (the `wandb` extra; `metrics.wandb_mode='offline'` writes a
local run to sync later).

On a local disk each record is appended as it is logged. An object store cannot
append, so for a URL workdir (`gs://...`) the writer keeps the run's records and
rewrites the whole `metrics.jsonl` object (a store replaces an object atomically:
readers see the previous version or the new one), and TensorBoard events are
written to a local folder whose files are uploaded over their objects. Both
happen at `flush()`: before every checkpoint save (so a resumed run never lacks
the records up to its checkpoint), every `flush_every_s` seconds, and at close.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time

from absl import logging

from cwm_jax import storage
from cwm_jax.base import ConfigError


class JsonlTracker:
  """`DIR/metrics.jsonl`: appended locally, rewritten whole on an object store."""

  def __init__(self, workdir: str):
    self.path = storage.join(workdir, "metrics.jsonl")
    self._remote = storage.is_url(workdir)
    self._lines: list[str] = []  # a URL workdir's whole file, rewritten at flush
    self._dirty = False
    storage.makedirs(workdir)
    if self._remote and storage.exists(self.path):
      self._lines = storage.read_text(self.path).splitlines(keepends=True)

  def truncate_after(self, step: int) -> None:
    if self._remote:
      kept = [l for l in self._lines if l.strip() and json.loads(l)["step"] <= step]
      if kept != self._lines:
        self._lines, self._dirty = kept, True
        self.flush()
      return
    if storage.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
      storage.write_text(self.path, "".join(kept))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    line = json.dumps({"step": int(step), **scalars}) + "\n"
    if self._remote:
      self._lines.append(line)
      self._dirty = True
    else:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)

  def flush(self) -> None:
    if self._remote and self._dirty:
      storage.write_text(self.path, "".join(self._lines))
      self._dirty = False

  def close(self) -> None:
    self.flush()


class TensorBoardTracker:
  """Scalars under `train/NAME` in `DIR/tensorboard` (a local folder uploaded for a URL)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._dir = storage.join(workdir, "tensorboard")
    self._local = tempfile.mkdtemp(prefix="cwm-tensorboard-") if storage.is_url(workdir) else None
    self._tb = SummaryWriter(self._local or self._dir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    for k, v in scalars.items():
      self._tb.add_scalar(f"train/{k}", v, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._local is not None:
      storage.upload_tree(self._local, self._dir)

  def close(self) -> None:
    self._tb.close()
    self._tb = None
    self.flush()
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)


class WandbTracker:
  """A wandb run per workdir (a stable id, so relaunches resume the same run)."""

  def __init__(self, workdir: str, project: str, mode: str, config: dict | None):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ModuleNotFoundError:
      raise ConfigError(
        "metrics.wandb_project is set but wandb is not installed; "
        "pip install 'cwm_jax[wandb]' or leave metrics.wandb_project empty"
      ) from None
    run_id = hashlib.sha256(storage.absolute(workdir).encode()).hexdigest()[:16]
    self._dir = tempfile.mkdtemp(prefix="cwm-wandb-")
    self._run = wandb.init(
      project=project,
      id=run_id,
      resume="allow",
      mode=mode,
      dir=self._dir,
      name=storage.basename(workdir),
      config=config,
    )

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._run.log(scalars, step=step)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self._run.finish()


class MetricsWriter:
  """Writes one record per logged step to every chosen tracker; logs a progress line."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    tensorboard: bool = True,
    total_steps: int | None = None,
    flush_every_s: float = 60.0,
    wandb_project: str = "",
    wandb_mode: str = "online",
    run_config: dict | None = None,
  ):
    self.enabled, self.total = enabled, total_steps
    self._flushed_at, self._flush_every_s = time.monotonic(), flush_every_s
    self._remote = storage.is_url(workdir)
    self._jsonl = None
    self.trackers: list = []
    if enabled:
      self._jsonl = JsonlTracker(workdir)
      self.trackers.append(self._jsonl)
      if tensorboard:
        self.trackers.append(TensorBoardTracker(workdir))
      if wandb_project:
        self.trackers.append(WandbTracker(workdir, wandb_project, wandb_mode, run_config))

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step` (logged after the checkpoint we resume from)."""
    if self._jsonl is not None:
      self._jsonl.truncate_after(step)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for t in self.trackers:
      t.write(step, scalars)
    record = {"step": int(step), **scalars}
    logging.info("%s", progress_line(record, self.total) if "loss" in record else eval_line(record))
    if self._remote and time.monotonic() - self._flushed_at >= self._flush_every_s:
      self.flush()

  def flush(self) -> None:
    """Makes everything logged so far durable in the workdir."""
    for t in self.trackers:
      t.flush()
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    for t in self.trackers:
      t.close()
    self.trackers = []


def eval_line(r: dict) -> str:
  """'eval step 10 | trace_nll 1.2345 | ...' for an evaluation record."""
  items = [f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(r.items()) if k != "step"]
  return " | ".join([f"eval step {r['step']}"] + items)


def progress_line(r: dict, total: int | None = None) -> str:
  """'step 10/20 | loss 5.1234 | grad 0.812 | lr 3.0e-03 | 12,345 tok/s | 41.0 ms | MFU 1.2%'."""
  parts = [
    f"step {r['step']}" + (f"/{total}" if total else ""),
    f"loss {r['loss']:.4f}",
    f"grad {r.get('grad_norm', 0):.3f}",
    f"lr {r.get('lr', 0):.1e}",
  ]
  if "tokens_per_sec" in r:
    parts += [f"{r['tokens_per_sec']:,.0f} tok/s", f"{1e3 * r['step_time']:.1f} ms"]
  if r.get("mfu"):
    parts.append(f"MFU {100 * r['mfu']:.2f}%")
  if "goodput/fraction" in r:
    parts.append(f"goodput {100 * r['goodput/fraction']:.0f}%")
  if r.get("eta_s") and math.isfinite(r["eta_s"]):
    parts.append(f"ETA {_duration(r['eta_s'])}")
  if r.get("bad_records"):
    parts.append(f"bad records {int(r['bad_records']):,}")
  if r.get("nonfinite_steps"):
    parts.append(f"non-finite steps {int(r['nonfinite_steps'])}")
  return " | ".join(parts)


def _duration(seconds: float) -> str:
  """'1h02m', '4m05s', '12s'."""
  s = int(round(seconds))
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
