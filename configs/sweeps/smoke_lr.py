"""4-point sweep over the smoke config: learning rate x (depth, width) pairs.

  python -m cwm_jax.sweep --config configs/smoke.py --sweep configs/sweeps/smoke_lr.py \
      --launcher local --workdir runs/sweeps [--dry_run]
"""

from cwm_jax.recipe.grids import axis, product, zip_


def get_sweep():
  return product(
    axis("optimizer.lr", [1e-3, 3e-3]),
    zip_(axis("total_steps", [10, 20]), axis("optimizer.warmup_steps", [2, 4])),
  )
