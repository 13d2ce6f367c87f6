"""The RL stage's programs as a planner step builder (`cwm_jax.train.planning`).

`rl_step_builder(config, cfg, mesh)` builds the jitted GRPO update step of
`cwm_jax.rl.grpo` on the train state the RL loop uses, with an abstract batch
of `config.batch_size` rows of `config.seq_len` tokens, and the sampler's
prefill, decode and extend step (`cwm_jax.infer.sampler`) for the same rows on
the same mesh: the training params in their training shardings, prompts padded
to `seq_len - rl.max_new_tokens` (as the trainer pads them), a KV cache of
`seq_len` columns sharded by the config's rules, and an appended block of
`sampler.EXTEND_BLOCK` tokens per row (at most the prompt length; a multi-turn
episode's tool output) into the full cache. So
`python -m cwm_jax.plan --config configs/cwm_32b.py:stage=rl --topology ...`
compiles the real programs of an RL stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from cwm_jax.infer import cache as kv
from cwm_jax.infer import sampler
from cwm_jax.model.layers import dtype_of
from cwm_jax.model.transformer import abstract_model
from cwm_jax.parallel import rows as rows_lib
from cwm_jax.parallel import sharding, transfer
from cwm_jax.rl import grpo
from cwm_jax.rl import trainer as trainer_lib
from cwm_jax.train import state as state_lib
from cwm_jax.train.planning import GIB, Program, Steps, Target, device_bytes

_FLOAT_KEYS = ("loss_mask", "old_logp", "advantages")


def sampler_programs(
  config, cfg, parts: state_lib.Parts, params: dict, resident, mesh=None
) -> dict:
  """{'prefill', 'decode', 'extend'}: the sampler's steps for the rows sampled at once
  (`rl.rollout_slots` with continuous batching, else `config.batch_size`), jitted with
  the sharded abstract `params` in their shardings, the cache donated, traced under the
  config's logical rules, on `mesh` (default: the training mesh).

  `resident` is what the devices hold beside the steps' arguments while sampling.
  """
  mesh = mesh or parts.batch_sharding.mesh
  rules = sharding.normalize_rules(config.rules)
  graphdef = nnx.split(abstract_model(cfg, parts.execution), nnx.Param)[0]
  rows = rows_lib.row_sharding(NamedSharding(mesh, parts.batch_sharding.spec))
  b, cache_len = config.rl.get("rollout_slots", 0) or config.batch_size, config.seq_len
  prompt_len = cache_len - config.rl.max_new_tokens

  def under_rules(step):
    def run(params, cache, tokens):
      with nnx.logical_axis_rules(rules):
        return step(nnx.merge(graphdef, params), cache, tokens)

    return run

  def program(step, cache, tokens, **info):
    """(Program of `step` on `cache`, the abstract cache it returns)."""
    cache = state_lib.with_shardings(cache, kv.cache_shardings(cache, mesh, rules))
    args = (params, cache, tokens)
    with jax.set_mesh(mesh):
      _, out = jax.eval_shape(under_rules(step), *args)
    out_sh = kv.cache_shardings(out, mesh, rules)  # a prefilled cache is not `empty`
    jitted = jax.jit(
      under_rules(step),
      in_shardings=jax.tree.map(lambda a: a.sharding, args),
      out_shardings=(rows, out_sh),
      donate_argnums=1,
    )
    info = dict(info, rows=b, cache_len=cache_len, cache_gb_per_device=device_bytes(cache) / GIB)
    return Program(jitted, args, resident, info, mesh), out

  with jax.set_mesh(mesh):  # the cache's layout follows the mesh's platform
    empty = jax.eval_shape(
      lambda: kv.init_cache(cfg, b, cache_len, dtype_of(parts.execution.compute_dtype))
    )
  prompt = jax.ShapeDtypeStruct((b, prompt_len), jnp.int32, sharding=rows)
  prefill, filled = program(sampler.prefill, empty, prompt, prompt_len=prompt_len)
  decode, _ = program(
    sampler.decode_step, filled, jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
  )
  block_len = min(sampler.EXTEND_BLOCK, prompt_len)
  block = jax.ShapeDtypeStruct((b, block_len), jnp.int32, sharding=prompt.sharding)
  extend, _ = program(sampler.extend, filled, block, block_len=block_len)
  return {"prefill": prefill, "decode": decode, "extend": extend}


def rollout_params(config, cfg, parts: state_lib.Parts, rollout_mesh) -> dict:
  """The abstract params the rollout replicas hold: the rollout specs
  (`transfer.rollout_specs`) on their mesh, in `rl.rollout_dtype`."""
  dtype = config.rl.rollout_dtype or None
  specs = transfer.rollout_specs(sharding.param_specs(cfg, sharding.normalize_rules(config.rules)))
  return jax.tree.map(
    lambda a, spec: jax.ShapeDtypeStruct(
      a.shape, dtype or a.dtype, sharding=NamedSharding(rollout_mesh, spec)
    ),
    parts.abstract["params"],
    specs,
  )


def rl_step_builder(config, cfg, mesh, target: Target | None = None) -> Steps:
  """The RL update step (args: sharded abstract train state, abstract batch) and the
  sampler's prefill, decode and extend steps ({'sampler': ...}) on `mesh`.

  While sampling, the train state beside the params stays on the devices; with
  `rl.async_rollouts` the sampler reads a published copy of the params, so the whole
  train state is resident while it samples and that copy while the update step runs.
  """
  parts = state_lib.parts(config, cfg, mesh)
  tx, schedule, run, abstract, shardings, batch_sh = parts
  rl = config.rl  # the RL trainer's schema (validated), so the same divisor as training
  fn = grpo.make_rl_step(
    cfg,
    tx,
    schedule,
    max_len=rl.loss_max_len or rl.max_new_tokens,
    eps_low=rl.eps_low,
    eps_high=rl.eps_high,
    rules=sharding.normalize_rules(config.rules),
    execution=run,
    grad_accum=config.grad_accum,
  )
  jitted = grpo.jit_rl_step(fn, shardings, batch_sh)
  row = rows_lib.row_sharding(batch_sh)
  b, t = config.batch_size, config.seq_len
  batch = {
    k: jax.ShapeDtypeStruct(
      (b, t), jnp.float32 if k in _FLOAT_KEYS else jnp.int32, sharding=batch_sh
    )
    for k in grpo.BATCH_KEYS
  }
  batch.update({k: jax.ShapeDtypeStruct((b,), jnp.float32, sharding=row) for k in grpo.ROW_KEYS})
  state = state_lib.with_shardings(abstract, shardings)
  if target is not None:  # the planner: validated for the slice's hosts and devices
    trainer_lib.validate(config, target.devices, target.processes)
  if target is not None and target.rollout_mesh is not None:
    rmesh = target.rollout_mesh
    replica_params = rollout_params(config, cfg, parts, rmesh)
    sync = transfer.sync_bytes(
      parts.abstract["params"],
      transfer.rollout_specs(sharding.param_specs(cfg, sharding.normalize_rules(config.rules))),
      dict(rmesh.shape),
      rl.rollout_dtype or None,
    )
    return Steps(
      Program(jitted, (state, batch)),
      {"rollout": sampler_programs(config, cfg, parts, replica_params, (), rmesh)},
      {
        "rollout": {
          "mesh": dict(rmesh.shape),
          "devices": rmesh.size,
          "replicas": rmesh.shape["data"],
          "param_dtype": str(jnp.dtype(rl.rollout_dtype or jnp.float32))
          if rl.rollout_dtype
          else "trainer's",
          "pipeline_depth": trainer_lib.pipeline_depth(rl),
        },
        "": {
          "weight_sync_gb": sync / 1e9,
          "weight_sync_bytes_per_rollout_device": sync // rmesh.size,
        },
      },
    )
  if rl.async_rollouts:
    update_resident, sampling_resident = state["params"], state
  else:
    update_resident, sampling_resident = (), {k: v for k, v in state.items() if k != "params"}
  return Steps(
    Program(jitted, (state, batch), update_resident),
    {"sampler": sampler_programs(config, cfg, parts, state["params"], sampling_resident)},
  )
