"""Train state {'params', 'opt_state', 'step', 'rng'}, created already sharded.

`abstract_state` runs `jax.eval_shape` on the initializer; `state_shardings`
maps parameter logical names through the config rules (optimizer moments
follow their parameters, scalars are replicated); `init_state` is
`jit(init, out_shardings=...)`, so no process ever holds the whole model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import init_model
from cwm_jax.parallel import sharding
from cwm_jax.train import optimizer
from cwm_jax.train.config import execution_config


def _init(
  cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, execution: Execution = Execution()
) -> dict:
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, seed, execution), nnx.Param))
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(jax.random.PRNGKey(seed)),
  }


def abstract_state(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  seed: int = 0,
  execution: Execution = Execution(),
) -> dict:
  """ShapeDtypeStruct tree of the train state; allocates nothing."""
  return jax.eval_shape(functools.partial(_init, cfg, tx, seed, execution))


def state_shardings(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  rules,
  mesh: Mesh,
  abstract: dict | None = None,
) -> dict:
  """NamedSharding tree matching the train state."""
  abstract = abstract or abstract_state(cfg, tx)
  params = sharding.named(mesh, sharding.param_specs(cfg, rules))
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract["opt_state"],
    params,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  return {"params": params, "opt_state": opt, "step": replicated, "rng": replicated}


def with_shardings(abstract: dict, shardings: dict) -> dict:
  """ShapeDtypeStructs carrying the target shardings (a restore target)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def jit_init(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  seed: int,
  shardings: dict,
  compiler_options: dict | None = None,
  execution: Execution = Execution(),
):
  """The jitted initializer: `jit_init(...)()` is a fresh, sharded state."""
  return jax.jit(
    functools.partial(_init, cfg, tx, seed, execution),
    out_shardings=shardings,
    compiler_options=compiler_options or None,
  )


def init_state(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  seed: int,
  shardings: dict,
  compiler_options: dict | None = None,
  execution: Execution = Execution(),
) -> dict:
  """A freshly initialised, sharded train state."""
  return jit_init(cfg, tx, seed, shardings, compiler_options, execution)()


class Parts(NamedTuple):
  """What every step built on a mesh needs: the optimizer and its schedule, the
  execution, the abstract train state, its shardings and the batch sharding."""

  tx: optax.GradientTransformation
  schedule: Callable
  execution: Execution
  abstract: dict
  shardings: dict
  batch_sharding: NamedSharding


def parts(config, cfg: ModelConfig, mesh: Mesh) -> Parts:
  """The `Parts` of a training config on `mesh` (allocates nothing)."""
  tx, schedule = optimizer.make_optimizer(config.optimizer, config.total_steps)
  run = execution_config(config)
  abstract = abstract_state(cfg, tx, config.seed, run)
  shardings = state_shardings(cfg, tx, config.rules, mesh, abstract)
  return Parts(
    tx, schedule, run, abstract, shardings, NamedSharding(mesh, sharding.batch_spec(config.rules))
  )
