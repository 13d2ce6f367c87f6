"""Flash-style blockwise attention in pure JAX, with a custom VJP.

Queries and keys are cut into blocks of C rows. `block_pairs` lists, in
Python, the (query block, key block) pairs that can hold a causal in-window
key, so compiled FLOPs follow the window: a local layer costs about
T * (W + C) score entries, a global one T^2 / 2. The pair scan keeps only the
output and the log-sum-exp from the forward pass, and its backward pass recomputes
the probabilities; both accumulate dq, dk, dv.

- Pair scan (`_flash`): scans the pairs with an online softmax. Live memory is
  O(T) plus one [B, K, C*G, C] block of scores. Pairs whose block has no
  allowed (query, key) at run time, e.g. two packed documents, are skipped by
  `lax.cond`.
- Rows (`_rowwise`): each query block takes its run of key blocks at once, R
  keys, with a plain softmax, the blocks unrolled in Python. It keeps every
  block's exponentials for the backward pass when they fit `KEEP_PROBS_BYTES`
  (else one [B, K, C*G, R] block of scores is alive at a time and the backward
  pass recomputes them). `use_rows` picks it on CPU for short sequences.

Legend: B batch, T query length, S key length, K kv heads, G queries per kv
head, N = K*G, H head dim, C block rows, R keys of a query block's run.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from cwm_jax.kernels import backend
from cwm_jax.kernels.masks import allowed, pad_rows, pad_segments

NEG_INF = -1e30


def block_pairs(
  n_q: int, n_k: int, chunk: int, window: int | None, q_offset: int = 0
) -> tuple[tuple[int, int], ...]:
  """Static (i, j) pairs where query block i may see key block j.

  Query row r sits at position `q_offset + r`, key row c at position c.
  `window=None` keeps every pair (relative positions unknown at trace time).
  """
  pairs = []
  for i in range(n_q):
    q_lo, q_hi = q_offset + i * chunk, q_offset + (i + 1) * chunk - 1
    for j in range(n_k):
      k_lo, k_hi = j * chunk, (j + 1) * chunk - 1
      if window is None or (q_hi - k_lo >= 0 and q_lo - k_hi < window):
        pairs.append((i, j))
  return tuple(pairs)


def _pad_1d(x, rows):
  return jnp.concatenate([x, x[-1] + 1 + jnp.arange(rows, dtype=x.dtype)]) if rows else x


def _rows(x, block, rows, axis=2):
  """Rows [block * rows, (block + 1) * rows) of x along `axis` (the row axis, or 3 for
  the columns of a transposed accumulator)."""
  return jax.lax.dynamic_slice_in_dim(x, block * rows, rows, axis=axis)


def _put(x, update, block, rows, axis=2):
  return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), block * rows, axis=axis)


class Schedule(NamedTuple):
  """The static plan of one kernel call, one non-differentiable (hashable) argument of the
  custom VJPs; each schedule reads its own fields.

  `block`: C, the rows of a query block and of a key block. `group`: G, the query heads
  per kv head, stacked under each query row. `window`: the layer's, which the mask
  applies. The pair scan (`_flash`) visits `pairs`, (query block, key block), skipping at
  run time a pair with no allowed (query, key) if `skip_empty`, its loop unrolled if
  `unroll`. The row schedule (`_rowwise`) takes per query block its `ranges` entry, the
  key blocks [first, end), and may keep its exponentials for the backward pass if
  `keep_probs` (`KEEP_PROBS_BYTES`).
  """

  block: int
  group: int
  window: int
  pairs: tuple[tuple[int, int], ...] = ()
  ranges: tuple[tuple[int, int], ...] | None = None
  skip_empty: bool = True
  unroll: bool = False
  keep_probs: bool = True


class Operands(NamedTuple):
  """A kernel call's arrays as both schedules take them, heads first (Legend)."""

  q: jax.Array  # [B, K, T*G, H]
  k: jax.Array  # [B, K, S, H]
  v: jax.Array  # [B, K, S, H]
  q_seg: jax.Array  # [B, T] segment ids
  k_seg: jax.Array  # [B, S]
  q_idx: jax.Array  # [T] positions
  k_idx: jax.Array  # [S]


def _block_mask(sched: Schedule, x: Operands, i, j):
  """[B, 1, C*G, C] allowed mask of query block i against key block j, each query row
  repeated for the G heads that share a kv head."""
  c, g = sched.block, sched.group
  sq = jax.lax.dynamic_slice_in_dim(x.q_seg, i * c, c, axis=1)
  sk = jax.lax.dynamic_slice_in_dim(x.k_seg, j * c, c, axis=1)
  qi = jax.lax.dynamic_slice_in_dim(x.q_idx, i * c, c)
  kj = jax.lax.dynamic_slice_in_dim(x.k_idx, j * c, c)
  mask = allowed(qi[None, :, None], kj[None, None, :], sq[:, :, None], sk[:, None, :], sched.window)
  b = mask.shape[0]
  return jnp.broadcast_to(mask[:, :, None, :], (b, c, g, c)).reshape(b, 1, c * g, c)


def _scores(q_BKQH, k_BKSH, mask):
  h = q_BKQH.shape[-1]
  s = jnp.einsum("BKQH,BKSH->BKQS", q_BKQH, k_BKSH, preferred_element_type=jnp.float32)
  return jnp.where(mask, s * (h**-0.5), NEG_INF)


def _block_grads(q_i, k_j, v_j, do_i, mask, lse_i, d_row_i, q_T_i, do_T_i):
  """One block's recomputed probabilities and its gradients (dq_i, dk_j^T, dv_j^T), dk and
  dv transposed as the backward passes accumulate them. `q_T_i` and `do_T_i` are q_i and
  do_i as [B, K, H, Q] (`_transposed`), the left operands of the dk / dv products."""
  s = _scores(q_i, k_j, mask)
  p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
  return _grads_from_probs(p, None, k_j, v_j, do_i, d_row_i, q_T_i, do_T_i)


def _grads_from_probs(p, inv_l, k_j, v_j, do_i, d_row_i, q_T_i, do_T_i):
  """`_block_grads` from a block's probabilities: `p` itself, or with `inv_l` [B, K, Q] the
  unnormalised exponentials the forward pass kept, whose rows inv_l normalises."""
  h = k_j.shape[-1]
  if inv_l is not None:  # scale the [H, Q] operand, not the [Q, S] probabilities
    do_T_i = do_T_i * inv_l[:, :, None, :].astype(do_T_i.dtype)
  dv_j = jnp.einsum(
    "BKHQ,BKQS->BKHS", do_T_i, p.astype(do_i.dtype), preferred_element_type=jnp.float32
  )
  dp = jnp.einsum("BKQH,BKSH->BKQS", do_i, v_j, preferred_element_type=jnp.float32)
  row = (h**-0.5) if inv_l is None else inv_l[..., None] * (h**-0.5)
  ds = (p * (dp - d_row_i[..., None]) * row).astype(q_T_i.dtype)
  dq_i = jnp.einsum("BKQS,BKSH->BKQH", ds, k_j, preferred_element_type=jnp.float32)
  dk_j = jnp.einsum("BKHQ,BKQS->BKHS", q_T_i, ds, preferred_element_type=jnp.float32)
  return dq_i, dk_j, dv_j


def _transposed(*xs_BKQH):
  """[B, K, H, Q] copies of [B, K, Q, H] arrays, kept as copies by an optimization barrier.
  XLA:CPU runs a block's dk / dv product [H, Q] x [Q, S] from such a copy as a plain
  product on its YNNPACK path. Without the barrier it folds the transpose back into the
  product, and the [Q, H]-transposed form runs on Eigen instead, at a lower rate."""
  return jax.lax.optimization_barrier(tuple(jnp.swapaxes(x, 2, 3) for x in xs_BKQH))


def _zeros_T(x_BKSH):
  """float32 zeros [B, K, H, S]: dk or dv accumulated transposed (see `_backward`)."""
  return jnp.zeros((*x_BKSH.shape[:2], x_BKSH.shape[3], x_BKSH.shape[2]), jnp.float32)


def _scan(step, carry, sched: Schedule):
  pairs = sched.pairs
  xs = (
    jnp.asarray([p[0] for p in pairs], jnp.int32),
    jnp.asarray([p[1] for p in pairs], jnp.int32),
  )
  carry, _ = jax.lax.scan(
    lambda carry, ij: (step(carry, ij), None),
    carry,
    xs,
    unroll=len(pairs) if sched.unroll else 1,
  )
  return carry


def _forward(sched: Schedule, x: Operands):
  """Online softmax over the pairs: (out [B,K,Q,H] f32, lse [B,K,Q] f32), Q = T*G."""
  b, kv, rows, h = x.q.shape
  c, cg = sched.block, sched.block * sched.group

  def step(carry, ij):
    acc, m, l = carry
    i, j = ij
    mask = _block_mask(sched, x, i, j)
    m_old, l_old, acc_old = _rows(m, i, cg), _rows(l, i, cg), _rows(acc, i, cg)

    def compute(_):
      s = _scores(_rows(x.q, i, cg), _rows(x.k, j, c), mask)
      m_new = jnp.maximum(m_old, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m_old - m_new)
      pv = jnp.einsum(
        "BKQS,BKSH->BKQH",
        p.astype(x.v.dtype),
        _rows(x.v, j, c),
        preferred_element_type=jnp.float32,
      )
      return acc_old * corr[..., None] + pv, m_new, l_old * corr + p.sum(-1)

    if sched.skip_empty:
      acc_i, m_i, l_i = jax.lax.cond(mask.any(), compute, lambda _: (acc_old, m_old, l_old), None)
    else:
      acc_i, m_i, l_i = compute(None)
    return _put(acc, acc_i, i, cg), _put(m, m_i, i, cg), _put(l, l_i, i, cg)

  init = (
    jnp.zeros((b, kv, rows, h), jnp.float32),
    jnp.full((b, kv, rows), NEG_INF, jnp.float32),
    jnp.zeros((b, kv, rows), jnp.float32),
  )
  acc, m, l = _scan(step, init, sched)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, NEG_INF, m + jnp.log(l_safe))
  return acc / l_safe[..., None], lse


def _backward(sched: Schedule, res, do, dlse):
  x, o, lse = res
  d_row = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1) - dlse
  c, cg = sched.block, sched.block * sched.group

  def step(carry, ij):
    dq, dk_T, dv_T = carry
    i, j = ij
    mask = _block_mask(sched, x, i, j)
    dq_old, dk_old, dv_old = _rows(dq, i, cg), _rows(dk_T, j, c, 3), _rows(dv_T, j, c, 3)

    def compute(_):
      # Plain swaps: XLA folds them back into the products, which stay as they were here
      # (TPU, GPU, long CPU sequences); `_transposed` was measured for the row schedule.
      q_i, do_i = _rows(x.q, i, cg), _rows(do, i, cg)
      dq_i, dk_j, dv_j = _block_grads(
        q_i,
        _rows(x.k, j, c),
        _rows(x.v, j, c),
        do_i,
        mask,
        _rows(lse, i, cg),
        _rows(d_row, i, cg),
        jnp.swapaxes(q_i, 2, 3),
        jnp.swapaxes(do_i, 2, 3),
      )
      return dq_old + dq_i, dk_old + dk_j, dv_old + dv_j

    if sched.skip_empty:
      dq_i, dk_j, dv_j = jax.lax.cond(mask.any(), compute, lambda _: (dq_old, dk_old, dv_old), None)
    else:
      dq_i, dk_j, dv_j = compute(None)
    return _put(dq, dq_i, i, cg), _put(dk_T, dk_j, j, c, 3), _put(dv_T, dv_j, j, c, 3)

  # dk and dv accumulate transposed ([B, K, H, S]): XLA:CPU runs a block's
  # [H, Q] x [Q, S] product faster than the [S, Q] x [Q, H] one, which contracts
  # the rows of both operands; one transpose at the end restores [B, K, S, H].
  init = (jnp.zeros(x.q.shape, jnp.float32), _zeros_T(x.k), _zeros_T(x.v))
  dq, dk_T, dv_T = _scan(step, init, sched)
  return (
    dq.astype(x.q.dtype),
    jnp.swapaxes(dk_T, 2, 3).astype(x.k.dtype),
    jnp.swapaxes(dv_T, 2, 3).astype(x.v.dtype),
  )


def _no_grads(dq, dk, dv) -> Operands:
  """The cotangent of `Operands`: none for the segment ids and positions."""
  return Operands(dq, dk, dv, None, None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(sched: Schedule, x: Operands):
  out, lse = _forward(sched, x)
  return out.astype(x.q.dtype), lse


def _named(out, lse):
  """The residuals a remat policy may keep (`backend.RESIDUALS`)."""
  return checkpoint_name(out, backend.RESIDUALS), checkpoint_name(lse, backend.RESIDUALS)


def _flash_fwd(sched: Schedule, x: Operands):
  out, lse = _forward(sched, x)
  out, lse = _named(out.astype(x.q.dtype), lse)
  return (out, lse), (x, out, lse)


def _flash_bwd(sched: Schedule, res, cotangents):
  do, dlse = cotangents
  return (_no_grads(*_backward(sched, res, do, dlse)),)


_flash.defvjp(_flash_fwd, _flash_bwd)


ROWS_MAX_BLOCKS = 16  # `use_rows`: the most query blocks the unrolled row schedule takes
ROWS_MAX_MEAN_KEYS = 1024  # `use_rows`: the most keys a query row's run holds on average


def use_rows(ranges, block: int, platform: str | None = None) -> bool:
  """The row schedule on CPU (`backend.Forms.row_schedule`) when every query block's key
  blocks are one run, there are at most `ROWS_MAX_BLOCKS` query blocks (it unrolls
  them), and the runs hold at most `ROWS_MAX_MEAN_KEYS` keys on average (`block` rows a
  key block); else the pair scan.
  On CPU a query block's scores against all its keys at once is one wider product
  (XLA:CPU runs [C*G, H] x [H, R] at a higher rate for wider R) and one softmax, where
  the scan pays per pair, so the kernel is faster in every layer kind at the shapes of
  benchmarks/train_step.py. Elsewhere the pair scan keeps one [C*G, C] block of
  scores alive.
  The cap on the mean run bounds the row schedule's memory: its blocks are unrolled and
  XLA keeps much of every block's [B, K, C*G, R] scores alive at once, so a global
  layer's scores grow as T^2, and a longer sequence on the pair scan compiled to fewer
  temporaries than a shorter one on the rows (benchmarks/attention_memory.py). Capped,
  they take at most 4 KiB per query row and head, and memory grows linearly in T on
  either side of the switch."""
  if ranges is None or len(ranges) > ROWS_MAX_BLOCKS:
    return False
  mean_keys = block * sum(end - first for first, end in ranges) / len(ranges)
  return mean_keys <= ROWS_MAX_MEAN_KEYS and backend.forms(platform).row_schedule


def row_ranges(pairs, n_q: int):
  """Per query block, the (first, last + 1) key block of its pairs, or None if the pairs
  of some block are not one contiguous run (or it has none)."""
  ranges = []
  for i in range(n_q):
    js = sorted(j for q_block, j in pairs if q_block == i)
    if not js or js != list(range(js[0], js[-1] + 1)):
      return None
    ranges.append((js[0], js[-1] + 1))
  return tuple(ranges)


def _row_block(sched: Schedule, x: Operands, i: int, key_blocks: tuple[int, int]):
  """Query block i's rows, its run of keys and values (`key_blocks`: the first key block
  and one past the last), and their [B, 1, C*G, R] mask."""
  c, g = sched.block, sched.group
  lo, hi = key_blocks[0] * c, key_blocks[1] * c
  cg = c * g
  sq, qi = x.q_seg[:, i * c : (i + 1) * c], x.q_idx[i * c : (i + 1) * c]
  mask = allowed(
    qi[None, :, None],
    x.k_idx[None, None, lo:hi],
    sq[:, :, None],
    x.k_seg[:, None, lo:hi],
    sched.window,
  )
  b, n = mask.shape[0], hi - lo
  mask = jnp.broadcast_to(mask[:, :, None, :], (b, c, g, n)).reshape(b, 1, cg, n)
  return x.q[:, :, i * cg : (i + 1) * cg], x.k[:, :, lo:hi], x.v[:, :, lo:hi], mask


def _rows_forward(sched: Schedule, x: Operands):
  """Plain softmax per query block over its key range: (out [B,K,Q,H] f32, lse [B,K,Q]),
  and per block its unnormalised exponentials [B, K, C*G, R] with 1 / their row sums
  [B, K, Q] (what `_rowwise_fwd` may keep for the backward pass)."""
  outs, lses, exps, inv_ls = [], [], [], []
  for i, key_blocks in enumerate(sched.ranges):
    q_i, k_r, v_r, mask = _row_block(sched, x, i, key_blocks)
    s = _scores(q_i, k_r, mask)
    m = s.max(-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    l = p.sum(-1)
    o = jnp.einsum("BKQS,BKSH->BKQH", p.astype(x.v.dtype), v_r, preferred_element_type=jnp.float32)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    outs.append(o / l_safe[..., None])
    lses.append(jnp.where(empty, NEG_INF, m + jnp.log(l_safe)))
    exps.append(p)
    inv_ls.append(1.0 / l_safe)
  cat = lambda xs: jnp.concatenate(xs, axis=2)
  return cat(outs), cat(lses), (tuple(exps), cat(inv_ls))


# `_rowwise` keeps the forward pass's exponentials for the backward pass when all of a
# call's fit in this many bytes (float32), and else recomputes them from q and k. Keeping
# them spares the backward pass each block's exponentials and their score product, which
# makes the whole train step of benchmarks/train_step.py a little faster. They are alive
# from the layer's forward pass to its backward (tens of MiB for a global layer at the
# benchmark's shapes). Unrolled layers keep them at no extra memory (the compiled step's
# temporaries are the same either way; XLA already held the forward's scores for the
# backward's), scanned ones would not (the scan stacks them and the switch over windows
# keeps every branch's), so the model asks for them only when unrolled (`keep_probs`).
KEEP_PROBS_BYTES = 64 << 20


def _probs_bytes(sched: Schedule, q) -> int:
  """float32 bytes of every query block's scores against its key blocks, for `q`
  [B, K, T*G, H]."""
  b, kv = q.shape[:2]
  c, g = sched.block, sched.group
  return sum(b * kv * c * g * (hi - lo) * c * 4 for lo, hi in sched.ranges)


def _rows_backward(sched: Schedule, res, do, dlse):
  x, o, lse, kept = res
  d_row = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1) - dlse
  c, cg = sched.block, sched.block * sched.group
  # dk and dv accumulate transposed, as in `_backward`.
  dq, dk_T, dv_T = [], _zeros_T(x.k), _zeros_T(x.v)
  q_T, do_T = _transposed(x.q, do)
  for i, key_blocks in enumerate(sched.ranges):
    q_i, k_r, v_r, mask = _row_block(sched, x, i, key_blocks)
    rows = slice(i * cg, (i + 1) * cg)
    if kept is None:
      dq_i, dk_j, dv_j = _block_grads(
        q_i,
        k_r,
        v_r,
        do[:, :, rows],
        mask,
        lse[:, :, rows],
        d_row[:, :, rows],
        q_T[..., rows],
        do_T[..., rows],
      )
    else:
      exps, inv_l = kept
      dq_i, dk_j, dv_j = _grads_from_probs(
        exps[i],
        inv_l[:, :, rows],
        k_r,
        v_r,
        do[:, :, rows],
        d_row[:, :, rows],
        q_T[..., rows],
        do_T[..., rows],
      )
    dq.append(dq_i)
    cols = slice(key_blocks[0] * c, key_blocks[1] * c)
    dk_T = dk_T.at[..., cols].add(dk_j)
    dv_T = dv_T.at[..., cols].add(dv_j)
  return (
    jnp.concatenate(dq, axis=2).astype(x.q.dtype),
    jnp.swapaxes(dk_T, 2, 3).astype(x.k.dtype),
    jnp.swapaxes(dv_T, 2, 3).astype(x.v.dtype),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rowwise(sched: Schedule, x: Operands):
  out, lse, _ = _rows_forward(sched, x)
  return out.astype(x.q.dtype), lse


def _rowwise_fwd(sched: Schedule, x: Operands):
  out, lse, kept = _rows_forward(sched, x)
  out, lse = _named(out.astype(x.q.dtype), lse)
  if not sched.keep_probs or _probs_bytes(sched, x.q) > KEEP_PROBS_BYTES:
    kept = None
  return (out, lse), (x, out, lse, kept)


def _rowwise_bwd(sched: Schedule, res, cotangents):
  do, dlse = cotangents
  return (_no_grads(*_rows_backward(sched, res, do, dlse)),)


_rowwise.defvjp(_rowwise_fwd, _rowwise_bwd)


def flash_attention(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  q_seg_BT,
  k_seg_BS,
  q_idx_T,
  k_idx_S,
  *,
  window: int,
  chunk: int,
  pairs=None,
  q_offset: int | None = 0,
  skip_empty: bool = True,
  unroll: bool = False,
  rows: bool | None = None,
  keep_probs: bool = True,
):
  """Attention with explicit positions; returns (out [B,T,N,H], lse [B,T,N] f32).

  `q_idx_T`/`k_idx_S` are the positions the mask compares (may be traced).
  Static block pairs come from `pairs`, else from `window` with queries
  starting at static key position `q_offset` (None: keep all pairs).
  Both outputs are differentiable, so partial results can be merged by
  log-sum-exp (ring attention).

  `rows` picks the schedule: True, one plain softmax per query block over its
  run of key blocks (unrolled; `skip_empty` and `unroll` do not apply); False, the
  scan over block pairs; None, `use_rows`. `keep_probs`: the row schedule may keep
  its probabilities for the backward pass (`KEEP_PROBS_BYTES`).

  Inside, each kv head's G query heads are stacked under its rows: queries
  [B, K, T*G, H] against keys [B, K, S, H], so every block product is a batched
  matmul with the batch dims leading (no per-block transposes).
  """
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  g = n // kv
  c = min(chunk, max(t, s))
  pad_t, pad_s = -t % c, -s % c
  tp = t + pad_t
  if pairs is None:
    pairs = block_pairs(
      tp // c, (s + pad_s) // c, c, None if q_offset is None else window, q_offset or 0
    )
  q = pad_rows(q_BTNH, pad_t, 0).reshape(b, tp, kv, g, h).transpose(0, 2, 1, 3, 4)
  heads_first = lambda x: pad_rows(x, pad_s, 0).transpose(0, 2, 1, 3)
  x = Operands(
    q.reshape(b, kv, tp * g, h),
    heads_first(k_BSKH),
    heads_first(v_BSKH),
    *pad_segments(q_seg_BT, k_seg_BS, pad_t, pad_s),
    _pad_1d(jnp.asarray(q_idx_T, jnp.int32), pad_t),
    _pad_1d(jnp.asarray(k_idx_S, jnp.int32), pad_s),
  )
  ranges = row_ranges(pairs, tp // c)
  if rows is None:
    rows = use_rows(ranges, c)
  elif rows and ranges is None:
    raise ValueError("rows=True needs each query block's key blocks to be one contiguous run")
  sched = Schedule(c, g, window, tuple(pairs), ranges, skip_empty, unroll, keep_probs)
  out, lse = (_rowwise if rows else _flash)(sched, x)
  out = out.reshape(b, kv, tp, g, h).transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)
  lse = lse.reshape(b, kv, tp, g).transpose(0, 2, 1, 3).reshape(b, tp, n)
  return out[:, :t], lse[:, :t]


def chunked_attention(
  q_BTNH,
  k_BTKH,
  v_BTKH,
  segment_ids_BT,
  *,
  window: int,
  chunk: int,
  skip_empty: bool = True,
  unroll: bool = False,
  rows: bool | None = None,
  keep_probs: bool = True,
):
  """Self-attention over packed rows; matches `reference_attention`."""
  idx = np.arange(q_BTNH.shape[1])
  out, _ = flash_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    segment_ids_BT,
    segment_ids_BT,
    idx,
    idx,
    window=window,
    chunk=chunk,
    skip_empty=skip_empty,
    unroll=unroll,
    rows=rows,
    keep_probs=keep_probs,
  )
  return out
