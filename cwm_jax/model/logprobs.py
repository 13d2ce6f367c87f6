"""Log-probabilities of chosen tokens: the one helper behind scoring, evaluation,
sampling and the RL objective.

Legend: B batch, T length, V vocab.
"""

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV, targets_BT):
  """log softmax(logits)[target], in float32, for any leading shape `[..., V]` / `[...]`."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  return jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0] - lse_BT
