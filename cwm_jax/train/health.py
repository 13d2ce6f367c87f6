"""What the training loop checks at every logged step (used by `cwm_jax.train.runtime`).

- `Guard`: a non-finite loss or gradient norm stops the run with `NonFiniteError`
  (programs exit 3) naming the last good checkpoint; with `optimizer.skip_nonfinite=N`
  such steps pass (the optimizer, wrapped in `optax.apply_if_finite`, skipped their
  update) until N come in a row.
- `bad_record_scalars`: the data iterator's bad-record counts as metrics.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cwm_jax.base import NonFiniteError
from cwm_jax.checkpoint.manager import Checkpointer


class Guard:
  """Stops the run on a non-finite loss or gradient norm (NonFiniteError, exit 3), or,
  with `optimizer.skip_nonfinite=N`, lets such steps pass (the optimizer skipped their
  update) until N in a row."""

  def __init__(self, max_skips: int, ckpt: Checkpointer):
    self.max_skips, self.ckpt = int(max_skips), ckpt
    self.in_a_row = self.skipped = 0
    self.seen = -1

  def check(self, step: int, scalars: dict) -> None:
    stop = self.observe(step, scalars)
    if stop is not None:
      raise stop

  def observe(self, step: int, scalars: dict) -> NonFiniteError | None:
    """Counts step's non-finite loss / grad norm (once per step); the error to stop with."""
    bad = {
      k: scalars[k] for k in ("loss", "grad_norm") if k in scalars and not np.isfinite(scalars[k])
    }
    if step != self.seen:
      self.seen = step
      self.in_a_row = self.in_a_row + 1 if bad else 0
      self.skipped += bool(bad)
      if bad and self.in_a_row <= self.max_skips:
        logging.warning(
          "step %d: non-finite %s; its update was skipped (%d in a row, at most %d)",
          step,
          bad,
          self.in_a_row,
          self.max_skips,
        )
    if not bad or self.in_a_row <= self.max_skips:
      return None
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    kept = (
      f"the last good checkpoint is step {last} in {self.ckpt.directory}"
      if last is not None
      else "no checkpoint was saved"
    )
    return NonFiniteError(
      f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; training "
      f"stopped, {kept}. Lower "
      "optimizer.lr (or raise warmup, clip_norm), or set optimizer.skip_nonfinite=N to "
      "skip up to N such steps in a row"
    )


def bad_record_scalars(data_iter) -> dict[str, float]:
  """`bad_records` (total) and `bad_records/REASON` of a data iterator that counts them,
  summed over processes (every process logs in step, so the gather is collective)."""
  counts = getattr(data_iter, "bad_record_counts", None)
  if counts is None:
    return {}
  by_reason = counts()
  if jax.process_count() > 1:
    local = np.asarray(list(by_reason.values()), np.int32)
    by_reason = dict(zip(by_reason, multihost_utils.process_allgather(local).sum(0).tolist()))
  out = {f"bad_records/{k}": float(v) for k, v in by_reason.items() if v}
  out["bad_records"] = float(sum(by_reason.values()))
  return out
