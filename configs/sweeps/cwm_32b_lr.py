"""Pre-training LR x warmup sweep for cwm_32b (e.g. on Slurm, each run its own allocation).

  python -m cwm_jax.sweep --config configs/cwm_32b.py:stage=pretrain \
      --sweep configs/sweeps/cwm_32b_lr.py --launcher slurm --workdir /ckpt/sweeps \
      --launcher_flags=--nodes=64 --dry_run
"""

from cwm_jax.recipe.grids import axis, product


def get_sweep():
  return product(
    axis("schedule.stages.pretrain.optimizer.lr", [1.5e-4, 3e-4, 6e-4]),
    axis("schedule.stages.pretrain.optimizer.warmup_steps", [1000, 2000]),
  )
