"""Sampling with a KV cache: prefill, a jitted decode loop, greedy / temperature / top-p.

Legend: B batch, P padded prompt length, T new tokens, D model, V vocab.

Prompts of different lengths are LEFT-padded to a common length P (rounded up
to `pad_multiple` to limit recompilation). Row b's real tokens sit in columns
`[start_b, P)` with RoPE positions `column - start_b`, so every row writes the
same cache column at each decode step and one ring slot serves the whole
batch; padding is masked by segment ids (cache.py).

Prefill and decode step are the model's own forward pass (`hidden_cached`):
the layers are scanned, each writing its slot of its window group's ring
buffer (global and local layers keep differently sized buffers), so compile
time does not grow with depth; the decode loop is one `lax.while_loop` that
stops when every row hit a stop token.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx

from cwm_jax.infer import cache as kv
from cwm_jax.model.layers import dtype_of
from cwm_jax.model.logprobs import token_logprobs

PAD_ID = 0


@dataclasses.dataclass
class GenerateResult:
  """Generated ids per prompt (prompt excluded, stop token included) and their
  log-probabilities under the model (softmax of raw logits: before temperature
  and top-p), as RL needs for old-policy log-probs."""
  tokens: list[list[int]]
  logprobs: list[list[float]]


def prefill(model, cache: kv.KVCache, tokens_BP):
  """Runs left-padded prompts through the model, filling an empty cache.

  Returns float32 logits [B, V] of the last column and the cache.
  """
  if not cache.empty:
    raise ValueError("prefill needs an empty cache (from init_cache); "
                     "feed further tokens with decode_step")
  h_BPD, cache = model.hidden_cached(tokens_BP, cache)
  return model.logits(h_BPD[:, -1:])[:, 0], cache


def decode_step(model, cache: kv.KVCache, token_B):
  """Feeds one token per row at column `cache.length`; logits [B, V] and the cache."""
  h_B1D, cache = model.hidden_cached(token_B[:, None], cache)
  return model.logits(h_B1D)[:, 0], cache


def top_p_filter(logits_BV, top_p):
  """Keeps the smallest set of top tokens whose probability reaches `top_p`."""
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
  n_keep_B = jnp.maximum(keep_BV.sum(-1), 1)
  threshold_B = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
  return jnp.where(logits_BV >= threshold_B, logits_BV, -jnp.inf)


def sample_token(logits_BV, key, temperature, top_p, greedy: bool):
  """Next token [B] and its log-probability under the raw model distribution."""
  if greedy:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  else:
    filtered = top_p_filter(logits_BV / temperature, top_p)
    token_B = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
  return token_B, token_logprobs(logits_BV, token_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy"))
def _generate(graphdef, state, tokens_BP, start_B, key, temperature, top_p, stop_ids,
              *, max_new: int, greedy: bool):
  model = nnx.merge(graphdef, state)
  b, p = tokens_BP.shape
  cache = kv.init_cache(model.cfg, start_B, p + max_new, dtype_of(model.execution.compute_dtype))
  logits_BV, cache = prefill(model, cache, tokens_BP)

  def pick(step, logits_BV, done_B, out):
    token_B, logp_B = sample_token(logits_BV, jax.random.fold_in(key, step), temperature,
                                   top_p, greedy)
    token_B = jnp.where(done_B, PAD_ID, token_B)
    tokens_BN, logps_BN, n_B = out
    out = (tokens_BN.at[:, step].set(token_B), logps_BN.at[:, step].set(logp_B),
           n_B + (~done_B).astype(jnp.int32))
    return token_B, done_B | jnp.isin(token_B, stop_ids), out

  out = (jnp.zeros((b, max_new), jnp.int32), jnp.zeros((b, max_new), jnp.float32),
         jnp.zeros((b,), jnp.int32))
  token_B, done_B, out = pick(0, logits_BV, jnp.zeros((b,), bool), out)

  def cond(carry):
    step, _, _, done_B, _ = carry
    return (step < max_new) & ~jnp.all(done_B)

  def body(carry):
    step, cache, token_B, done_B, out = carry
    logits_BV, cache = decode_step(model, cache, token_B)
    token_B, done_B, out = pick(step, logits_BV, done_B, out)
    return step + 1, cache, token_B, done_B, out

  _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token_B, done_B, out))
  return out


def left_pad(prompts, multiple: int = 1):
  """[B, P] int32 left-padded prompts and [B] start columns; P rounds up to `multiple`."""
  longest = max(len(p) for p in prompts)
  p = -(-longest // multiple) * multiple
  tokens = np.full((len(prompts), p), PAD_ID, np.int32)
  starts = np.zeros((len(prompts),), np.int32)
  for i, prompt in enumerate(prompts):
    starts[i] = p - len(prompt)
    tokens[i, starts[i]:] = prompt
  return tokens, starts


def _check(model, prompts, max_new_tokens, temperature, top_p):
  cfg = model.cfg
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and no empty prompt; "
                     "start each prompt with at least one token (e.g. BOS)")
  bad = sorted({t for p in prompts for t in p if not 0 <= t < cfg.vocab_size})
  if bad:
    raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                     f"[0, {cfg.vocab_size}); check the tokenizer matches the checkpoint")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  longest = max(len(p) for p in prompts) + max_new_tokens
  if longest > cfg.max_seq_len:
    raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's max_seq_len="
                     f"{cfg.max_seq_len}; shorten the prompt or lower max_new_tokens")


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids=(), seed: int = 0,
             pad_multiple: int = 32, row_sharding: NamedSharding | None = None
             ) -> GenerateResult:
  """Generates up to `max_new_tokens` per prompt; temperature 0 is greedy.

  A row stops after emitting any of `stop_ids` (which is kept in its output).
  `row_sharding` (a sharding of the [B] rows, e.g. over the training mesh's data axes)
  spreads the prompts over devices: the params keep their own (training) shardings and
  the jitted prefill and decode loop run sharded, with no host copy of the params.
  """
  _check(model, prompts, max_new_tokens, temperature, top_p)
  tokens_BP, start_B = left_pad(prompts, pad_multiple)
  tokens_BP, start_B = jnp.asarray(tokens_BP), jnp.asarray(start_B)
  if row_sharding is not None:
    spec = row_sharding.spec
    tokens_BP = jax.device_put(tokens_BP, NamedSharding(row_sharding.mesh, P(spec[0], None)))
    start_B = jax.device_put(start_B, row_sharding)
  graphdef, state = nnx.split(model)
  greedy = temperature == 0
  tokens_BN, logps_BN, n_B = _generate(
      graphdef, state, tokens_BP, start_B, jax.random.key(seed),
      jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
      jnp.asarray(list(stop_ids) or [-1], jnp.int32), max_new=max_new_tokens, greedy=greedy)
  tokens_BN, logps_BN, n_B = jax.device_get((tokens_BN, logps_BN, n_B))
  return GenerateResult(tokens=[row[:n].tolist() for row, n in zip(tokens_BN, n_B)],
                        logprobs=[row[:n].tolist() for row, n in zip(logps_BN, n_B)])
