"""The RL update step as a planner step builder (`cwm_jax.train.planning`).

`rl_step_builder(config, cfg, mesh)` builds the jitted GRPO update step of
`cwm_jax.rl.grpo` on the train state the RL loop uses, with an abstract batch
of `config.batch_size` rows of `config.seq_len` tokens, so
`python -m cwm_jax.plan --config configs/cwm_32b.py:stage=rl --topology ...`
compiles the real RL update step of an RL stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from cwm_jax.parallel import sharding
from cwm_jax.rl import grpo
from cwm_jax.train import state as state_lib

_FLOAT_KEYS = ("loss_mask", "old_logp", "advantages")


def rl_step_builder(config, cfg, mesh):
  """(jitted RL update step, sharded abstract state, abstract batch) on `mesh`."""
  tx, schedule, run, abstract, shardings, batch_sh = state_lib.parts(config, cfg, mesh)
  rl = config.rl  # the RL trainer's schema (validated), so the same divisor as training
  fn = grpo.make_rl_step(cfg, tx, schedule, max_len=rl.loss_max_len or rl.max_new_tokens,
                         eps_low=rl.eps_low, eps_high=rl.eps_high,
                         rules=sharding.normalize_rules(config.rules), execution=run)
  jitted = grpo.jit_rl_step(fn, shardings, batch_sh)
  row = NamedSharding(mesh, jax.sharding.PartitionSpec(batch_sh.spec[0]))
  b, t = config.batch_size, config.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k in _FLOAT_KEYS else jnp.int32,
                                   sharding=batch_sh) for k in grpo.BATCH_KEYS}
  batch.update({k: jax.ShapeDtypeStruct((b,), jnp.float32, sharding=row) for k in grpo.ROW_KEYS})
  return jitted, state_lib.with_shardings(abstract, shardings), batch
