"""The learnable-from-scratch toy RL run: a 16-token vocabulary, the 'which digit' task.

  python -m cwm_jax.train --config configs/rl_digits.py:steps=30 --workdir /tmp/digits

A 1-layer model of width 32 learns to answer with the digit the prompt names, from
random initialisation, in a few dozen GRPO steps on a CPU: what the RL tests and
`benchmarks/rl_toy.py` run. Variants (`:key=value,...`): steps=N (default 30), seed=S.
"""

import ml_collections

from cwm_jax.base import ConfigError, check_fields
from cwm_jax.rl.trainer import rl_config
from cwm_jax.train.config import base_config, parse_variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_variant(arg)
  check_fields(variant, ("steps", "seed"), "configs/rl_digits.py", "variant keys")
  try:
    steps, seed = int(variant.get("steps", 30)), int(variant.get("seed", 0))
  except ValueError as e:
    raise ConfigError(f"configs/rl_digits.py: steps and seed must be integers ({e})") from e
  c = base_config()
  c.trainer = "rl"
  c.seed = seed
  c.model.overrides.update(
    dict(
      n_layers=1,
      dim=32,
      n_heads=2,
      n_kv_heads=1,
      head_dim=16,
      ffn_dim=64,
      vocab_size=16,
      local_window=8,
      global_window=32,
    )
  )
  c.seq_len, c.batch_size, c.total_steps = 8, 128, steps
  c.checkpoint_every, c.checkpoint.async_save, c.metrics.tensorboard = 0, False, False
  c.optimizer.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
  c.mesh.update(data=-1, fsdp=1)
  c.rl = rl_config()
  c.rl.update(tasks="digits", group_size=8, max_new_tokens=1)
  return c
