"""AdamW with global-norm clipping, a weight-decay mask and LR schedules.

Schedules ('cosine': linear warmup then cosine to `min_lr_ratio * lr`;
'linear': warmup then linear decay; 'wsd': warmup, stable, then linear decay
over the last `decay_fraction` of the steps; 'constant': warmup then flat).
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def make_schedule(opt, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of the `optimizer` config section."""
  steps = int(opt.decay_steps or total_steps)
  warmup = min(int(opt.warmup_steps), steps)
  peak, floor = float(opt.lr), float(opt.lr) * float(opt.min_lr_ratio)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), floor)
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if opt.schedule == "linear":
    decay = optax.linear_schedule(peak, floor, max(steps - warmup, 1))
    return optax.join_schedules([ramp, decay], [warmup])
  if opt.schedule == "wsd":
    n_decay = max(int(round(steps * float(opt.decay_fraction))), 1)
    stable = max(steps - warmup - n_decay, 0)
    decay = optax.linear_schedule(peak, floor, n_decay)
    return optax.join_schedules(
      [ramp, optax.constant_schedule(peak), decay], [warmup, warmup + stable]
    )
  if opt.schedule == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"optimizer.schedule={opt.schedule!r} must be one of {SCHEDULES}")


def decay_mask(params):
  """True for parameters that get weight decay: matrices that are not embeddings or norms."""

  def keep(path, x):
    keys = [str(getattr(k, "key", k)) for k in path]
    excluded = any(k == "embed" or k.endswith("norm") for k in keys)
    return x.ndim >= 2 and not excluded

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optax chain: clip by global norm, then AdamW with the decay mask."""
  schedule = make_schedule(opt, total_steps)
  parts = []
  if opt.clip_norm and opt.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
  parts.append(
    optax.adamw(
      schedule,
      b1=float(opt.b1),
      b2=float(opt.b2),
      eps=float(opt.eps),
      weight_decay=float(opt.weight_decay),
      mask=decay_mask,
    )
  )
  tx = optax.chain(*parts)
  if int(opt.get("skip_nonfinite", 0)) > 0:  # a non-finite gradient's update is skipped
    tx = optax.apply_if_finite(tx, max_consecutive_errors=int(opt.skip_nonfinite))
  return tx, schedule
