"""CWM's GRPO variant: group advantages, the clip-higher token loss, and the jitted RL step.

  advantage   A_i = R_i - mean_group(R)            (no division by the std)
  ratio       r_it = exp(logp_it - old_logp_it)    (old = the policy that sampled, recorded
                                                    at rollout time)
  token loss  l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)
  loss        sum_{i,t} m_it l_it / (N * max_len)  (m: loss mask; N: sequences in the loss;
                                                    max_len fixed, not the sequence's length)
No KL term. Groups whose advantages are all zero are skipped (their rows get m = 0 and do
not count in N). The mask is zero on prompt and environment tokens, so in multi-turn
episodes only the policy's own tokens are trained.

Legend: B sequences, T length, V vocab, N groups, G samples per group.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.layers import constrain
from cwm_jax.model.logprobs import token_logprobs
from cwm_jax.parallel import rows as rows_lib
from cwm_jax.train import step as step_lib

EPS_LOW, EPS_HIGH = 0.2, 0.25
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "old_logp")
ROW_KEYS = ("advantages",)


def group_advantages(rewards_NG) -> np.ndarray:
  """R - mean(R) within each group (row of `rewards_NG`), no std normalisation."""
  rewards_NG = np.asarray(rewards_NG, np.float32)
  return rewards_NG - rewards_NG.mean(axis=1, keepdims=True)


def groups_kept(advantages_NG, atol: float = 1e-6) -> np.ndarray:
  """[N] bool: the groups with some non-zero advantage (the others carry no signal)."""
  return np.any(np.abs(np.asarray(advantages_NG)) > atol, axis=1)


def grpo_loss(
  logp_BT,
  old_logp_BT,
  advantages_B,
  mask_BT,
  *,
  max_len: int,
  eps_low: float = EPS_LOW,
  eps_high: float = EPS_HIGH,
  divisors=None,
):
  """(loss, metrics) of the CWM GRPO objective; see the module docstring. `divisors`
  (`loss_divisors` of the whole batch) make the loss and metrics of a micro-batch its
  share of the whole batch's, so micro-batches add up (gradient accumulation)."""
  mask_BT = mask_BT.astype(jnp.float32)
  adv_BT = advantages_B[:, None].astype(jnp.float32)
  ratio_BT = jnp.exp(logp_BT - old_logp_BT)
  unclipped_BT = ratio_BT * adv_BT
  clipped_BT = jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high) * adv_BT
  token_loss_BT = -jnp.minimum(unclipped_BT, clipped_BT)
  n_seqs, n_tokens = loss_divisors(mask_BT) if divisors is None else divisors
  loss = jnp.sum(mask_BT * token_loss_BT) / (n_seqs * max_len)
  blocked_BT = clipped_BT < unclipped_BT  # the clip is active: no gradient through the token
  metrics = {
    "clip_fraction": jnp.sum(mask_BT * blocked_BT) / n_tokens,
    "ratio_mean": jnp.sum(mask_BT * ratio_BT) / n_tokens,
    "approx_kl": jnp.sum(mask_BT * (old_logp_BT - logp_BT)) / n_tokens,
    "loss_sequences": n_seqs.astype(jnp.float32),
  }
  return loss, metrics


def loss_divisors(mask_BT):
  """(sequences with a policy token, policy tokens), each at least 1: what the loss and
  the token metrics divide by."""
  mask_BT = mask_BT.astype(jnp.float32)
  n_seqs = jnp.maximum(jnp.sum(jnp.any(mask_BT > 0, axis=1)), 1)
  return n_seqs, jnp.maximum(jnp.sum(mask_BT), 1.0)


def make_rl_step(
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  schedule,
  *,
  max_len: int,
  eps_low: float = EPS_LOW,
  eps_high: float = EPS_HIGH,
  rules=None,
  execution: Execution = Execution(),
  grad_accum: int = 1,
):
  """The pure `rl_step(state, batch) -> (state, metrics)` on the train state of
  `cwm_jax.train.state` (the shared update step, `train.step.make_update_step`, with the
  GRPO objective); jit it with `jit_rl_step`. `grad_accum` micro-batches of
  B / grad_accum rows each add their share of the whole batch's loss and gradient."""

  def objective(model, batch, divisors):
    inputs = {k: constrain(batch[k], ("batch", "seq")) for k in BATCH_KEYS}
    logits_BTV = model(inputs["inputs"], inputs["positions"], inputs["segment_ids"])
    logp_BT = token_logprobs(logits_BTV, inputs["targets"])
    loss, metrics = grpo_loss(
      logp_BT,
      inputs["old_logp"],
      batch["advantages"],
      inputs["loss_mask"],
      max_len=max_len,
      eps_low=eps_low,
      eps_high=eps_high,
      divisors=divisors,
    )
    metrics.pop("loss_sequences")  # the whole batch's, not a share: set below
    return loss, dict(metrics, loss=loss)

  step = step_lib.make_update_step(
    cfg,
    tx,
    schedule,
    objective,
    divisors=lambda batch: loss_divisors(batch["loss_mask"]),
    grad_accum=grad_accum,
    rules=rules,
    execution=execution,
  )

  def rl_step(state: dict, batch: dict) -> tuple[dict, dict[str, Any]]:
    new_state, metrics = step(state, batch)
    n_seqs = loss_divisors(batch["loss_mask"])[0]
    return new_state, dict(metrics, loss_sequences=n_seqs.astype(jnp.float32))

  return rl_step


def jit_rl_step(step_fn, state_shardings, batch_sharding, compiler_options=None):
  """jit with explicit shardings and the state donated ([B] rows follow the batch axis)."""
  row = rows_lib.row_sharding(batch_sharding)
  in_batch = {**{k: batch_sharding for k in BATCH_KEYS}, **{k: row for k in ROW_KEYS}}
  return step_lib.jit_update_step(step_fn, state_shardings, in_batch, compiler_options)
