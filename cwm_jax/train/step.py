"""Loss and the pure, jitted `train_step(state, batch) -> (state, metrics)`.

The loss of a batch is `sum(w * ce) / sum(w)` over the whole global batch
(plus `z_loss * sum(w * logsumexp^2) / sum(w)`), so neither sharding nor
gradient accumulation changes it: micro-batches sum unnormalised gradients,
which are divided by the total weight once.

Legend: B batch, T length, D model, V vocab, C loss chunks, M micro-batches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.layers import constrain
from cwm_jax.model.transformer import abstract_model

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def _ce_sums(logits_BTV, targets_BT, weights_BT):
  """(sum w*ce, sum w*lse^2) from float32 logits."""
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(weights_BT * (lse_BT - target_BT)), jnp.sum(weights_BT * lse_BT ** 2)


def loss_sums(model, batch: dict, chunk: int = 0):
  """Unnormalised (sum w*ce, sum w*lse^2) of a batch.

  With `chunk` > 0 the vocabulary projection runs over T in chunks under
  remat, so at most one [B, chunk, V] float32 block of logits is alive.
  """
  h_BTD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  targets, weights = batch["targets"], batch["weights"]
  b, t, d = h_BTD.shape
  if not chunk or chunk >= t:
    return _ce_sums(model.logits(h_BTD), targets, weights)
  n = t // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(carry, xs):
    h, y, w = xs
    ce, z = _ce_sums(model.logits(h), y, w)
    return (carry[0] + ce, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (ce, z), _ = jax.lax.scan(body, (zero, zero), (split(h_BTD), split(targets), split(weights)))
  return ce, z


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, T] -> [M, B/M, T] taking rows i::M, so each shard's rows stay local."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
  return {key: split(batch[key]) for key in BATCH_KEYS}


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule,
                    *, grad_accum: int = 1, z_loss: float = 0.0, loss_chunk: int = 0,
                    rules=None, execution: Execution = Execution()):
  """The pure train step; jit it with `jit_train_step`."""
  graphdef = nnx.split(abstract_model(cfg, execution), nnx.Param)[0]

  def objective(params, micro):
    model = nnx.merge(graphdef, params)
    micro = {k: constrain(v, ("batch", "seq")) for k, v in micro.items()}
    ce, z = loss_sums(model, micro, loss_chunk)
    return ce + z_loss * z, (ce, z)

  grad_fn = jax.grad(objective, has_aux=True)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict[str, Any]]:
    with nnx.logical_axis_rules(rules or ()):
      params = state["params"]
      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))

      def accumulate(carry, micro):
        grads, (ce, z) = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (grads, ce, z)), None

      (grads, ce, z), _ = jax.lax.scan(accumulate, zeros, _micro_batches(batch, grad_accum))
      total_w = jnp.maximum(jnp.sum(batch["weights"]), 1e-9)
      grads = jax.tree.map(lambda g: g / total_w, grads)
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                   "step": state["step"] + 1, "rng": state["rng"]}
    metrics = {"loss": ce / total_w, "z_loss": z / total_w,
               "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "weight_sum": total_w}
    return new_state, metrics

  return train_step


def jit_train_step(step_fn, state_shardings, batch_sharding, compiler_options=None):
  """jit with explicit shardings and the state donated."""
  batch_sh = {k: batch_sharding for k in BATCH_KEYS}
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=0,
                 compiler_options=compiler_options or None)
