"""Sampling with a KV cache: prefill, a jitted decode loop, greedy / temperature / top-p,
and multi-turn sampling that keeps the cache between turns.

Legend: B batch, P padded prompt length, T new tokens, D model, V vocab.

Prompts of different lengths are RIGHT-padded to a common length P (rounded up
to `pad_multiple` to limit recompilation): row b's tokens sit at columns (=
positions) 0.., and the cache counts each row's tokens (cache.py), so rows grow
at their own pace. Three jitted programs, each the model's own forward pass
(`hidden_cached`, layers scanned, so compile time does not grow with depth):

* prefill: the padded prompts into an empty cache, logits at each row's last token;
* extend: a further block per row (a tool's output and the next headers) into a
  cache that holds earlier turns, logits at each row's last new token (in slices
  of EXTEND_BLOCK columns);
* decode: one `lax.while_loop` that samples, feeds each unfinished row's token and
  stops when every row hit a stop token.

`generate` is prefill + decode. `Turns` samples a fixed set of rows turn after
turn: each turn feeds only the tokens the cache lacks (`extend`), never the whole
context again. With a `row_sharding` the rows are spread over the mesh (the params
keep their training shardings, nothing goes through the host); when that mesh spans
several processes each process passes its own rows and gets its own rows back.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.infer import cache as kv
from cwm_jax.kernels import backend
from cwm_jax.model.layers import dtype_of
from cwm_jax.model.logprobs import token_logprobs
from cwm_jax.parallel import rows as rows_lib

PAD_ID = 0
# Columns of one appended block (`extend`): its attention scores span the whole cache,
# [B, N, EXTEND_BLOCK, S + EXTEND_BLOCK], so longer additions go in several blocks.
EXTEND_BLOCK = 128


@dataclasses.dataclass
class GenerateResult:
  """Generated ids per prompt (prompt excluded, stop token included) and their
  log-probabilities under the model (softmax of raw logits: before temperature
  and top-p), as RL needs for old-policy log-probs."""

  tokens: list[list[int]]
  logprobs: list[list[float]]


def _last(h_BTD, n_B):
  """Each row's hidden state at its last real token [B, 1, D]."""
  return jnp.take_along_axis(h_BTD, jnp.maximum(n_B - 1, 0)[:, None, None], axis=1)


def prefill(model, cache: kv.KVCache, tokens_BP, n_B=None):
  """Runs right-padded prompts (row b's first `n_B[b]` tokens, default all) through
  the model into an empty cache. Returns float32 logits [B, V] at each row's last
  token and the cache."""
  if not cache.empty:
    raise ValueError(
      "prefill needs an empty cache (from init_cache); "
      "feed further tokens with extend or decode_step"
    )
  return extend(model, cache, tokens_BP, n_B)


def extend(model, cache: kv.KVCache, tokens_BT, n_B=None):
  """Feeds row b's first `n_B[b]` tokens (default all) after what the cache holds;
  float32 logits [B, V] at each row's last fed token and the cache."""
  n_B = jnp.full(tokens_BT.shape[:1], tokens_BT.shape[1], jnp.int32) if n_B is None else n_B
  h_BTD, cache = model.hidden_cached(tokens_BT, cache, n_B)
  return model.logits(_last(h_BTD, n_B))[:, 0], cache


def decode_step(model, cache: kv.KVCache, token_B, feed_B=None, layers=None):
  """Feeds one token per row (only rows where `feed_B`, default all) at each row's
  next column; logits [B, V] and the cache. `layers`: as in `hidden_cached`."""
  n_B = None if feed_B is None else feed_B.astype(jnp.int32)
  h_B1D, cache = model.hidden_cached(token_B[:, None], cache, n_B, layers)
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


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, tokens_BP, n_B, *, cache_len: int):
  model = nnx.merge(graphdef, state)
  cache = kv.init_cache(
    model.cfg, tokens_BP.shape[0], cache_len, dtype_of(model.execution.compute_dtype)
  )
  return prefill(model, cache, tokens_BP, n_B)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _extend(graphdef, state, cache, tokens_BT, n_B):
  return extend(nnx.merge(graphdef, state), cache, tokens_BT, n_B)


# On CPU a decode step of up to this many layers runs them unrolled on weights sliced
# before the loop (`Transformer.layer_states`): the scanned stack copies every weight each
# step, which dominates a small model's decode step. Deeper models keep the scan, whose
# compile time is flat in depth, where unrolled layers' compile time grows with depth
# (benchmarks/sampler.py --compile_layers).
UNROLL_DECODE_LAYERS = 16


def unroll_decode(cfg) -> bool:
  """Whether the decode loop runs the layers unrolled on weights sliced before it."""
  return backend.forms().unrolled_decode and cfg.n_layers <= UNROLL_DECODE_LAYERS


@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_new", "greedy", "unrolled"), donate_argnames=("cache",)
)
def _decode(
  graphdef,
  state,
  cache,
  logits_BV,
  done_B,
  key,
  temperature,
  top_p,
  stop_ids,
  *,
  max_new: int,
  greedy: bool,
  unrolled: bool,
):
  """Samples up to `max_new` tokens per row that is not `done_B` from `logits_BV` on:
  (tokens [B, N], log-probs [B, N], counts [B], cache). A sampled token is fed
  (written to the cache) at the next step, if the loop runs one: the last token of a
  row still going when the loop ends is not in the cache (`cache.length_B` counts what is).
  `unrolled` (`unroll_decode`): the layers run unrolled on weights sliced before the loop,
  and on the cache split by layer (`cache.by_layer`)."""
  model = nnx.merge(graphdef, state)
  b = logits_BV.shape[0]
  layers = None
  if unrolled:  # each layer's weights and cache buffers as arrays of their own, read in place
    layers, cache = model.layer_states(), kv.by_layer(cache)

  def pick(step, logits_BV, done_B, out):
    token_B, logp_B = sample_token(
      logits_BV, jax.random.fold_in(key, step), temperature, top_p, greedy
    )
    token_B = jnp.where(done_B, PAD_ID, token_B)
    tokens_BN, logps_BN, n_B = out
    out = (
      tokens_BN.at[:, step].set(token_B),
      logps_BN.at[:, step].set(logp_B),
      n_B + (~done_B).astype(jnp.int32),
    )
    return token_B, done_B | jnp.isin(token_B, stop_ids), out

  out = (
    jnp.zeros((b, max_new), jnp.int32),
    jnp.zeros((b, max_new), jnp.float32),
    jnp.zeros((b,), jnp.int32),
  )
  feed_B = ~done_B
  token_B, done_B, out = pick(0, logits_BV, done_B, out)

  def cond(carry):
    step, _, _, _, done_B, _ = carry
    return (step < max_new) & ~jnp.all(done_B)

  def body(carry):
    step, cache, token_B, feed_B, done_B, out = carry
    logits_BV, cache = decode_step(model, cache, token_B, feed_B, layers)
    feed_B = ~done_B
    token_B, done_B, out = pick(step, logits_BV, done_B, out)
    return step + 1, cache, token_B, feed_B, done_B, out

  _, cache, _, _, _, out = jax.lax.while_loop(
    cond, body, (jnp.int32(1), cache, token_B, feed_B, done_B, out)
  )
  return out + (kv.by_window(cache),)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _empty_rows(cache, rows_B):
  return cache.replace(length_B=jnp.where(rows_B, 0, cache.length_B))


def right_pad(rows, multiple: int = 1, width: int | None = None):
  """[B, P] int32 right-padded rows and [B] lengths; P is `width` or the longest row,
  rounded up to `multiple`."""
  longest = max(len(r) for r in rows) if width is None else width
  p = max(-(-longest // multiple) * multiple, 1)
  tokens = np.full((len(rows), p), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    tokens[i, : len(row)] = row
  return tokens, np.asarray([len(r) for r in rows], np.int32)


def _check(model, prompts, max_new_tokens, temperature, top_p):
  cfg = model.cfg
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(
      "generate needs at least one prompt and no empty prompt; "
      "start each prompt with at least one token (e.g. BOS)"
    )
  bad = sorted({t for p in prompts for t in p if not 0 <= t < cfg.vocab_size})
  if bad:
    raise ValueError(
      f"prompt token ids {bad[:5]} are outside the vocabulary "
      f"[0, {cfg.vocab_size}); check the tokenizer matches the checkpoint"
    )
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  longest = max(len(p) for p in prompts) + max_new_tokens
  if longest > cfg.max_seq_len:
    raise ValueError(
      f"prompt + max_new_tokens = {longest} exceeds the model's max_seq_len="
      f"{cfg.max_seq_len}; shorten the prompt or lower max_new_tokens"
    )


class _Rows:
  """Puts the rows on the devices and brings them back: plain arrays without a
  `row_sharding`; with one, the global [B, ...] array of every process's rows
  (`global_rows` False: each process passes and gets back its own rows) or of the rows
  every process passes alike (`global_rows` True: each gets all of them back, and the
  only collectives are on the row sharding's own devices)."""

  def __init__(self, row_sharding: NamedSharding | None, local_rows: int, global_rows=False):
    self.sharding, self.local = row_sharding, local_rows
    self.all = global_rows and row_sharding is not None
    self.multi = row_sharding is not None and not row_sharding.is_fully_addressable and not self.all
    if self.multi:
      counts = multihost_utils.process_allgather(np.int32(local_rows))
      if len(set(counts.tolist())) != 1:
        raise ValueError(
          f"every process must sample the same number of rows, got {counts.tolist()}"
        )
    self.rows = local_rows * (jax.process_count() if self.multi else 1)

  def agree(self, value: int) -> int:
    """The largest of every process's `value` (a padded width all must use)."""
    return int(multihost_utils.process_allgather(np.int32(value)).max()) if self.multi else value

  def put(self, local: np.ndarray):
    if self.sharding is None:
      return jnp.asarray(local)
    return rows_lib.global_array(local, rows_lib.row_sharding(self.sharding), self.rows)

  def get(self, *arrays) -> list[np.ndarray]:
    if self.all and not self.sharding.is_fully_addressable:
      everywhere = NamedSharding(self.sharding.mesh, P())
      return [np.asarray(jax.device_put(a, everywhere).addressable_shards[0].data) for a in arrays]
    if not self.multi:
      return [np.asarray(a) for a in jax.device_get(arrays)]
    return [rows_lib.local_rows(a, self.sharding) for a in arrays]


class Turns:
  """Samples one message per row, turn after turn, keeping the KV cache.

  The first call prefills each row's context; a later call feeds each active row
  only the tokens of its context the cache does not hold yet (the last sampled
  token, a tool's output, the next headers), so a turn costs its new tokens, not
  the whole context. Rows are fixed (finished ones pass `active=False`: nothing
  is fed or sampled for them) and hold at most `cache_len` tokens each (None: the
  first call's padded width + its `max_new_tokens`, enough for one turn).
  """

  def __init__(
    self,
    model,
    rows: int,
    cache_len: int | None,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids=(),
    seed: int = 0,
    pad_multiple: int = 32,
    row_sharding: NamedSharding | None = None,
    global_rows: bool = False,
  ):
    if cache_len is not None and cache_len > model.cfg.max_seq_len:
      raise ValueError(
        f"cache_len={cache_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
      )
    self.graphdef, self.state = nnx.split(model)
    self.model, self.cache_len, self.pad = model, cache_len, pad_multiple
    self.temperature, self.top_p, self.seed, self.turn = temperature, top_p, seed, 0
    self.stop_ids = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    self.io = _Rows(row_sharding, rows, global_rows)
    self.cache, self.held = None, np.zeros((rows,), np.int64)  # tokens the cache holds per row

  def __call__(
    self, contexts: list[list[int]], max_new_tokens: int, active: list[bool] | None = None
  ) -> GenerateResult:
    """One message for each active row of `contexts` (each row's whole context so far;
    it must extend what earlier turns fed). Inactive rows get an empty message."""
    active = np.ones(len(contexts), bool) if active is None else np.asarray(active, bool)
    if len(contexts) != self.io.local or len(active) != self.io.local:
      raise ValueError(f"Turns was built for {self.io.local} rows, got {len(contexts)}")
    live = [c for c, a in zip(contexts, active) if a]
    if live or not contexts:  # no rows at all: _check names the error
      _check(self.model, live, max_new_tokens, self.temperature, self.top_p)
    new = [list(c[h:]) if a else [] for c, h, a in zip(contexts, self.held, active)]
    if any(a and not n for n, a in zip(new, active)):
      raise ValueError("an active row's context adds nothing to what the cache holds")
    width = self.io.agree(max(len(r) for r in new))
    if self.cache is None:  # a prefill: one block, padded to limit recompiles
      tokens, n = right_pad(new, self.pad, width)
    else:  # blocks of EXTEND_BLOCK (fewer: a power of two) columns
      tokens, n = right_pad(new, min(EXTEND_BLOCK, 1 << max(width - 1, 1).bit_length()), width)
    if self.cache_len is None:
      self.cache_len = tokens.shape[1] + max_new_tokens
    longest = max((len(c) + max_new_tokens for c in live), default=0)
    if longest > self.cache_len:
      raise ValueError(
        f"a context of {longest - max_new_tokens} tokens + {max_new_tokens} "
        f"new exceeds the cache's {self.cache_len} columns"
      )
    if self.cache is None:
      logits, cache = _prefill(
        self.graphdef, self.state, self.io.put(tokens), self.io.put(n), cache_len=self.cache_len
      )
    else:
      logits, cache = self._extend(tokens, n)
    greedy = self.temperature == 0
    key = jax.random.fold_in(jax.random.key(self.seed), self.turn)
    tokens_BN, logps_BN, count_B, self.cache = _decode(
      self.graphdef,
      self.state,
      cache,
      logits,
      self.io.put(~active),
      key,
      jnp.float32(max(self.temperature, 1e-6)),
      jnp.float32(self.top_p),
      self.stop_ids,
      max_new=max_new_tokens,
      greedy=greedy,
      unrolled=unroll_decode(self.model.cfg),
    )
    self.turn += 1
    tokens_BN, logps_BN, count_B, self.held = self.io.get(
      tokens_BN, logps_BN, count_B, self.cache.length_B
    )
    return GenerateResult(
      tokens=[row[:c].tolist() for row, c in zip(tokens_BN, count_B)],
      logprobs=[row[:c].tolist() for row, c in zip(logps_BN, count_B)],
    )

  def reset(self, rows) -> None:
    """Empties the cache rows where `rows` (a [rows] bool mask) is set: their next context
    starts afresh (a new prompt in a freed slot). What they held is never read again: a
    row attends only to the columns its count says it holds."""
    rows = np.asarray(rows, bool)
    self.held = np.where(rows, 0, self.held)
    if self.cache is not None and rows.any():
      self.cache = _empty_rows(self.cache, self.io.put(rows))

  def _extend(self, tokens: np.ndarray, n: np.ndarray):
    """Feeds a [B, W] block in slices of at most EXTEND_BLOCK columns; the logits at each
    row's last token come from the last slice holding any of its tokens."""
    cache, logits, step = self.cache, None, min(EXTEND_BLOCK, tokens.shape[1])
    for c in range(0, tokens.shape[1], step):
      n_c = np.clip(n - c, 0, step).astype(np.int32)
      new, cache = _extend(
        self.graphdef, self.state, cache, self.io.put(tokens[:, c : c + step]), self.io.put(n_c)
      )
      logits = new if logits is None else jnp.where(self.io.put(n_c > 0)[:, None], new, logits)
    return logits, cache


def generate(
  model,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  stop_ids=(),
  seed: int = 0,
  pad_multiple: int = 32,
  row_sharding: NamedSharding | None = None,
  global_rows: bool = False,
) -> GenerateResult:
  """Generates up to `max_new_tokens` per prompt; temperature 0 is greedy.

  A row stops after emitting any of `stop_ids` (which is kept in its output).
  `row_sharding` (a sharding of the [B] rows, e.g. over the training mesh's data axes)
  spreads the prompts over devices: the params keep their own (training) shardings and
  the jitted prefill and decode loop run sharded, with no host copy of the params.
  Over a multi-process mesh, `prompts` are this process's rows (every process passes
  as many) and the result holds them; with `global_rows` every process passes all rows
  alike and gets all of them back (the rollout replicas of `parallel.transfer`).
  """
  return Turns(
    model,
    len(prompts),
    None,
    temperature=temperature,
    top_p=top_p,
    stop_ids=stop_ids,
    seed=seed,
    pad_multiple=pad_multiple,
    row_sharding=row_sharding,
    global_rows=global_rows,
  )(prompts, max_new_tokens)


def generate_slots(
  model,
  prompts: list[list[int]],
  *,
  slots: int,
  max_new_tokens: int,
  round_tokens: int = 16,
  temperature: float = 0.0,
  top_p: float = 1.0,
  stop_ids=(),
  seed: int = 0,
  pad_multiple: int = 32,
  row_sharding: NamedSharding | None = None,
  global_rows: bool = False,
) -> GenerateResult:
  """`generate` with continuous batching: `slots` cache rows serve every prompt, and a
  row that finishes (a stop id, or `max_new_tokens`) frees its slot for the next prompt,
  so decoding never waits on the longest row with rows left to start.

  Each round feeds every busy slot what its cache lacks (a new prompt, or the token it
  sampled last) and samples up to `round_tokens` more (`Turns`: one extend, one decode
  loop); a finished row's slot is emptied (`Turns.reset`) and refilled. Greedy results
  equal `generate`'s. Sampled results follow the slot a prompt lands in (one key per
  round), deterministically. `row_sharding` / `global_rows` as in `generate` (`slots`
  rows per call, as `generate` takes its prompts).
  """
  if slots < 1:
    raise ValueError(f"slots={slots} must be >= 1")
  if round_tokens < 1:
    raise ValueError(f"round_tokens={round_tokens} must be >= 1")
  _check(model, prompts, max_new_tokens, temperature, top_p)
  cache_len = max(len(p) for p in prompts) + max_new_tokens + round_tokens
  turns = Turns(
    model,
    slots,
    min(cache_len, model.cfg.max_seq_len),
    temperature=temperature,
    top_p=top_p,
    stop_ids=stop_ids,
    seed=seed,
    pad_multiple=pad_multiple,
    row_sharding=row_sharding,
    global_rows=global_rows,
  )
  stops = set(stop_ids)
  queue = list(range(len(prompts)))[::-1]
  owner: list[int | None] = [None] * slots  # the prompt each slot serves
  contexts: list[list[int]] = [[] for _ in range(slots)]
  tokens: list[list[int]] = [[] for _ in prompts]
  logprobs: list[list[float]] = [[] for _ in prompts]
  # Over processes that each pass their own rows, rounds go on while any has work (collectives).
  while turns.io.agree(int(bool(queue) or any(o is not None for o in owner))):
    fresh = np.zeros(slots, bool)
    for s in range(slots):
      if owner[s] is None and queue:
        owner[s], fresh[s] = queue.pop(), True
        contexts[s] = list(prompts[owner[s]])
    turns.reset(fresh)
    active = [o is not None for o in owner]
    left = [max_new_tokens - len(tokens[o]) if o is not None else 0 for o in owner]
    out = turns(contexts, round_tokens, active)  # one decode program for every round
    for s, o in enumerate(owner):
      if o is None:
        continue
      new, logps = out.tokens[s][: left[s]], out.logprobs[s][: left[s]]
      tokens[o] += new
      logprobs[o] += logps
      contexts[s] += new
      if len(tokens[o]) >= max_new_tokens or (new and new[-1] in stops):
        owner[s] = None
  return GenerateResult(tokens, logprobs)
