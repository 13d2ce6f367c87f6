"""Loss and the pure, jitted `train_step(state, batch) -> (state, metrics)`.

The loss of a batch is `sum(w * ce) / sum(w)` over the whole global batch
(plus `z_loss * sum(w * logsumexp^2) / sum(w)`), so neither sharding nor
gradient accumulation changes it: each micro-batch's loss sum is divided by the
total weight of the whole batch (known before any gradient), so micro-batch
gradients add up to the batch's and no pass over the gradients rescales them.

Legend: B batch, T length, D model, V vocab, C loss chunks, M micro-batches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from cwm_jax.kernels import backend
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.layers import constrain
from cwm_jax.model.transformer import abstract_model

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def _ce_sums(logits_BTV, targets_BT, weights_BT):
  """(sum w*ce, sum w*lse^2) from float32 logits."""
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(weights_BT * (lse_BT - target_BT)), jnp.sum(weights_BT * lse_BT**2)


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


def loss_total(model, batch: dict, z_loss: float = 0.0, chunk: int = 0):
  """`(ce + z_loss * z, (ce, z))` of a batch, for differentiating the total only.

  On CPU targets the head and the loss run fused (`_fused_head_loss`): the
  gradient of each block of tokens is formed while its logits are in cache, and
  no [B, T, V] logits are kept for the backward pass. Elsewhere it is
  `loss_sums` (with its `chunk` remat).
  """
  if not backend.forms().fused_loss_head:
    ce, z = loss_sums(model, batch, chunk)
    return ce + z_loss * z, (ce, z)
  h_BTD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  b, t, d = h_BTD.shape
  rows = _fused_rows(b * t, model.cfg.vocab_size, chunk * b if chunk else 0)
  total, ce, z = _fused_head_loss(
    float(z_loss),
    rows,
    h_BTD.reshape(b * t, d),
    model.lm_head[...].astype(h_BTD.dtype),
    batch["targets"].reshape(-1),
    batch["weights"].reshape(-1),
  )
  return total, (ce, z)


# float32 logits of one block of the fused head loss. Each block adds its [D, V] weight
# gradient into the running sum, a pass over D*V floats, so fewer, larger blocks are
# faster (head + loss fwd+bwd at the benchmarks/train_step.py configs, against 8 MiB).
FUSED_BLOCK_BYTES = 32 << 20


def _fused_rows(m: int, vocab: int, requested: int) -> int:
  """Rows per block: `requested` if it divides m, else the largest divisor of m whose
  [rows, V] float32 logits fit FUSED_BLOCK_BYTES (at least 1)."""
  if requested and m % requested == 0:
    return requested
  cap = max(1, FUSED_BLOCK_BYTES // (4 * vocab))
  return max(r for r in range(1, min(m, cap) + 1) if m % r == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_head_loss(z_loss, rows, h_MD, w_DV, targets_M, weights_M):
  """(total, sum w*ce, sum w*lse^2) of M tokens, total = ce + z_loss * z.

  Only `total` is differentiable: the backward pass scales the gradient of the
  total, formed block by block in the forward pass (rows tokens at a time).
  """
  return _fused_blocks(z_loss, rows, h_MD, w_DV, targets_M, weights_M, grads=False)[0]


def _fused_blocks(z_loss, rows, h_MD, w_DV, targets_M, weights_M, grads: bool):
  m, d = h_MD.shape
  v = w_DV.shape[1]
  blocks = lambda x: x.reshape(m // rows, rows, *x.shape[1:])

  def body(carry, xs):
    ce, z, dw_DV = carry
    h_RD, y_R, w_R = xs[:3]
    logits_RV = jnp.dot(h_RD, w_DV, preferred_element_type=jnp.float32)
    max_R1 = jnp.max(logits_RV, axis=-1, keepdims=True)
    exp_RV = jnp.exp(logits_RV - max_R1)
    sum_R1 = jnp.sum(exp_RV, axis=-1, keepdims=True)
    lse_R = (max_R1 + jnp.log(sum_R1))[:, 0]
    target_R = jnp.take_along_axis(logits_RV, y_R[:, None], axis=-1)[:, 0]
    ce, z = ce + jnp.sum(w_R * (lse_R - target_R)), z + jnp.sum(w_R * lse_R**2)
    if not grads:
      return (ce, z, dw_DV), None
    # d(total)/d(logits) = w * ((1 + 2 z_loss lse) softmax - onehot)
    scale_R1 = (w_R * (1.0 + 2.0 * z_loss * lse_R))[:, None] / sum_R1
    hot_RV = jnp.arange(v, dtype=y_R.dtype)[None] == y_R[:, None]
    d_RV = (exp_RV * scale_R1 - jnp.where(hot_RV, w_R[:, None], 0.0)).astype(h_RD.dtype)
    dh_RD = jnp.dot(d_RV, w_DV.T, preferred_element_type=jnp.float32)
    h_DR = xs[3]
    dw_DV = dw_DV + jnp.dot(h_DR, d_RV, preferred_element_type=jnp.float32)
    return (ce, z, dw_DV), dh_RD

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros((d, v) if grads else (), jnp.float32))
  # Each block's hidden states also enter transposed, from one transpose outside the
  # loop: XLA:CPU runs the weight gradient's [D, R] x [R, V] product faster than
  # the same product contracting the rows of a [R, D] block (benchmarks/train_step.py
  # --breakdown, head_and_loss).
  xs = (blocks(h_MD), blocks(targets_M), blocks(weights_M))
  xs += (jnp.swapaxes(xs[0], 1, 2),) if grads else ()
  (ce, z, dw_DV), dh = jax.lax.scan(body, init, xs)
  total = ce + z_loss * z
  return (total, ce, z), (None if dh is None else dh.reshape(m, d), dw_DV)


def _fused_forward(z_loss, rows, h_MD, w_DV, targets_M, weights_M):
  h, w = h_MD.value, w_DV.value
  out, (dh_MD, dw_DV) = _fused_blocks(
    z_loss, rows, h, w, targets_M.value, weights_M.value, grads=True
  )
  return out, (dh_MD.astype(h.dtype), dw_DV.astype(w.dtype))


def _fused_backward(z_loss, rows, res, cotangents):
  g_total, g_ce, g_z = cotangents
  if not (isinstance(g_ce, SymbolicZero) and isinstance(g_z, SymbolicZero)):
    raise NotImplementedError(
      "the fused head loss differentiates only its total "
      "(ce + z_loss * z); use loss_sums for other gradients"
    )
  dh_MD, dw_DV = res
  if isinstance(g_total, SymbolicZero):
    return jnp.zeros_like(dh_MD), jnp.zeros_like(dw_DV), None, None
  return (g_total * dh_MD).astype(dh_MD.dtype), (g_total * dw_DV).astype(dw_DV.dtype), None, None


_fused_head_loss.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)


def micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [M, B/M, ...] taking rows i::M, so each shard's rows stay local."""

  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)

  return {key: split(x) for key, x in batch.items()}


def make_update_step(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  schedule,
  objective,
  *,
  divisors,
  grad_accum: int = 1,
  rules=None,
  execution: Execution = Execution(),
):
  """The pure `step(state, batch) -> (state, metrics)` of any objective: the LM loss
  (`make_train_step`) and GRPO (`rl.grpo.make_rl_step`) are this step with their own
  `objective` and `divisors`.

  `divisors(batch)` is computed once from the whole batch (what the loss divides by);
  `objective(model, micro, divisors) -> (value, sums)` gives a micro-batch's share of the
  whole batch's loss (the differentiated value) and a dict of metric shares, so with
  `grad_accum` micro-batches (B / grad_accum rows each) values, sums and gradients add
  up to the whole batch's and no pass over the gradients rescales them. The metrics are
  the sums plus `grad_norm` and `lr`.
  """
  graphdef = nnx.split(abstract_model(cfg, execution), nnx.Param)[0]
  value_and_grad = jax.value_and_grad(
    lambda params, micro, div: objective(nnx.merge(graphdef, params), micro, div), has_aux=True
  )

  def step(state: dict, batch: dict) -> tuple[dict, dict[str, Any]]:
    with nnx.logical_axis_rules(rules or ()):
      params = state["params"]
      div = divisors(batch)
      if grad_accum == 1:  # no zero-filled accumulator, no extra pass over the gradients
        (_, sums), grads = value_and_grad(params, batch, div)
      else:

        def accumulate(carry, micro):
          return jax.tree.map(jnp.add, carry, value_and_grad(params, micro, div)), None

        shapes = jax.eval_shape(value_and_grad, params, batch, div)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        ((_, sums), grads), _ = jax.lax.scan(accumulate, zeros, micro_batches(batch, grad_accum))
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
      }
    return new_state, {**sums, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}

  return step


def jit_update_step(step_fn, state_shardings, batch_shardings: dict, compiler_options=None):
  """jit with explicit shardings ({key: sharding} of the batch) and the state donated."""
  mesh = next(iter(batch_shardings.values())).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
    compiler_options=compiler_options or None,
  )


def make_train_step(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  schedule,
  *,
  grad_accum: int = 1,
  z_loss: float = 0.0,
  loss_chunk: int = 0,
  rules=None,
  execution: Execution = Execution(),
):
  """The pure LM train step; jit it with `jit_train_step`. The batch's total weight
  divides the loss, so gradients come out normalised."""

  def objective(model, micro, total_w):
    micro = {k: constrain(micro[k], ("batch", "seq")) for k in BATCH_KEYS}
    total, (ce, z) = loss_total(model, micro, z_loss, loss_chunk)
    return total / total_w, {"loss": ce / total_w, "z_loss": z / total_w}

  def divisors(batch):
    return jnp.maximum(jnp.sum(batch["weights"]), 1e-9)

  step = make_update_step(
    cfg,
    tx,
    schedule,
    objective,
    divisors=divisors,
    grad_accum=grad_accum,
    rules=rules,
    execution=execution,
  )

  def train_step(state: dict, batch: dict) -> tuple[dict, dict[str, Any]]:
    batch = {k: batch[k] for k in BATCH_KEYS}
    new_state, metrics = step(state, batch)
    return new_state, dict(metrics, weight_sum=divisors(batch))

  return train_step


def jit_train_step(step_fn, state_shardings, batch_sharding, compiler_options=None):
  """jit with explicit shardings and the state donated."""
  return jit_update_step(
    step_fn, state_shardings, {k: batch_sharding for k in BATCH_KEYS}, compiler_options
  )
