"""Every attention backend matches the dense reference: windows, GQA, packed
documents, gradients; the chunked kernel's block list covers exactly the window."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cwm_jax import kernels
from cwm_jax.base import ConfigError
from cwm_jax.kernels import chunked
from cwm_jax.kernels.chunked import block_pairs
from cwm_jax.kernels.masks import allowed
from cwm_jax.model.execution import Execution
from cwm_jax.train.flops import causal_pairs


def _inputs(b, t, n, k, h, n_docs, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  seg = np.sort(rng.integers(0, n_docs, size=(b, t)), axis=1)
  return q, kk, v, jnp.asarray(seg, jnp.int32)


def _value_and_grads(attn, q, k, v):
  """Output and gradients of a fixed random projection of it."""
  proj = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v) * proj)
  return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, atol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0)


@pytest.mark.parametrize(
  "rows,keep",
  [(True, True), (True, False), (False, True)],
  ids=["rows", "rows_recomputed", "pair_scan"],
)
def test_chunked_matches_reference_windows_gqa_documents_gradients(rows, keep, monkeypatch):
  # T=45 is not a multiple of the chunk (8); windows: self only, < chunk, spans blocks, global.
  # The row schedule keeps its probabilities for the backward pass, or with no room recomputes.
  if not keep:
    monkeypatch.setattr(chunked, "KEEP_PROBS_BYTES", 0)
  q, k, v, seg = _inputs(2, 45, 6, 2, 8, n_docs=4)

  @jax.jit
  def both(q, k, v):
    out = {}
    for w in (1, 5, 19, 64):
      ref = lambda q, k, v, w=w: kernels.attend(q, k, v, seg, window=w, impl="reference")
      chk = lambda q, k, v, w=w: kernels.chunked_attention(
        q, k, v, seg, window=w, chunk=8, rows=rows
      )
      out[w] = (_value_and_grads(ref, q, k, v), _value_and_grads(chk, q, k, v))
    return out

  for ref, chk in both(q, k, v).values():
    _assert_close(chk, ref, atol=2e-6)


def test_one_query_row_in_the_cpu_cache_layout_matches_numpy():
  """A decode step's attention (one query row; keys [B, K, S, H], values [B, K, H, S], the
  matrix-vector form) and the same with [B, S, K, H] buffers both equal a NumPy softmax
  over the keys the window allows."""
  b, s, n, kv, h, window = 3, 10, 6, 2, 8, 4
  rng = np.random.default_rng(2)
  q, k, v = (
    rng.normal(size=shape).astype(np.float32)
    for shape in ((b, 1, n, h), (b, s, kv, h), (b, s, kv, h))
  )
  k_idx = np.tile(np.arange(s), (b, 1))
  q_idx = np.asarray([[9], [5], [2]])  # rows at different columns of the cache
  k_seg = (k_idx <= q_idx).astype(np.int32)  # slots not yet written are empty (0)
  run = lambda keys, values, kk, vv: kernels.reference_attention(
    q,
    kk,
    vv,
    np.ones((b, 1), np.int32),
    k_seg,
    window=window,
    q_idx_BT=q_idx,
    k_idx_BS=k_idx,
    keys=keys,
    values=values,
  )
  cpu = run("BKSH", "BKHS", k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1))
  accelerator = run("BSKH", "BSKH", k, v)
  want = np.zeros((b, 1, n, h))
  for r in range(b):
    seen = (k_idx[r] <= q_idx[r, 0]) & (k_idx[r] > q_idx[r, 0] - window)
    for head in range(n):
      g = head // (n // kv)
      scores = k[r, seen, g] @ q[r, 0, head] / np.sqrt(h)
      p = np.exp(scores - scores.max())
      want[r, 0, head] = (p / p.sum()) @ v[r, seen, g]
  np.testing.assert_allclose(cpu, want, atol=2e-6, rtol=0)
  np.testing.assert_allclose(accelerator, want, atol=2e-6, rtol=0)


def test_cpu_schedule_and_block_rows():
  """On CPU short sequences take the row schedule with blocks of T/16 rows (global) or
  max(T/16, W/2) (local; W/4 for heads of at most 32 dims), a power of two in [64, 512]
  ([32, 512] for those thin local layers); long ones (more than 16 query blocks, or runs
  of more than 1024 keys on average), or any accelerator, the pair scan."""
  assert [
    kernels.resolve_chunk(0, t, "cpu", w)
    for t, w in [
      (512, 128),
      (512, 512),
      (1024, 256),
      (1024, 1024),
      (2048, None),
      (100, 100),
      (4096, 1024),
      (131072, 8192),
    ]
  ] == [64, 64, 128, 64, 128, 64, 512, 512]
  thin = lambda t, w, h: kernels.resolve_chunk(0, t, "cpu", w, head_dim=h)
  assert [
    thin(512, 128, 32),
    thin(512, 128, 64),
    thin(512, 256, 32),
    thin(512, 512, 32),
    thin(256, 64, 16),
    thin(4096, 1024, 32),
  ] == [32, 64, 64, 64, 32, 256]
  assert kernels.resolve_chunk(0, 1024, "tpu", 256) == 512
  assert kernels.resolve_chunk(24, 1024, "cpu", 256) == 24
  ranges = lambda t, c, w: chunked.row_ranges(chunked.block_pairs(t // c, t // c, c, w), t // c)
  assert ranges(256, 64, 100) == ((0, 1), (0, 2), (0, 3), (1, 4))
  assert chunked.use_rows(ranges(1024, 64, 1024), 64, "cpu")  # 16 query blocks
  assert not chunked.use_rows(ranges(2048, 64, 1024), 64, "cpu")  # 32: the pair scan
  assert not chunked.use_rows(ranges(1024, 64, 1024), 64, "gpu")
  # Runs of 1088 keys on average (global, 16 blocks of 128): the pair scan; a local
  # layer's runs at the same length hold 864.
  assert not chunked.use_rows(ranges(2048, 128, 2048), 128, "cpu")
  assert chunked.use_rows(ranges(2048, 128, 1024), 128, "cpu")
  assert chunked.use_rows(ranges(1024, 512, 1024), 512, "cpu")  # 768 keys on average
  assert not chunked.use_rows(ranges(2048, 512, 2048), 512, "cpu")  # 1280
  assert chunked.row_ranges([(0, 0), (1, 0), (1, 2)], 2) is None  # not one run of keys
  with pytest.raises(ValueError, match="contiguous"):
    chunked.flash_attention(
      *_inputs(1, 16, 2, 1, 8, n_docs=1)[:3],
      *(np.ones((1, 16)),) * 2,
      np.arange(16),
      np.arange(16),
      window=16,
      chunk=4,
      pairs=[(0, 0), (1, 0), (2, 0), (2, 2), (3, 3)],
      rows=True,
    )


@pytest.mark.speed_check
def test_row_backward_contracts_no_operand_over_its_rows():
  """The row schedule's backward feeds its dk / dv block products from transposed copies
  of q and dO, so every compiled batched product contracts its left operand's last dim
  (its output has the left operand's rank). Contracting the rows instead runs on
  XLA:CPU's slower Eigen path.
  Speed check: it reads XLA:CPU's compiled HLO, so an XLA upgrade that trips it is a speed
  regression, not a wrong result."""
  q, k, v, seg = _inputs(2, 64, 4, 2, 8, n_docs=1)
  loss = lambda q, k, v: jnp.sum(
    kernels.chunked_attention(q, k, v, seg, window=64, chunk=16, rows=True) ** 2
  )
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  dots = re.findall(
    r"= f32\[([\d,]+)\]\S* dot\(.*?lhs_batch_dims=\{[\d,]+\}, "
    r"lhs_contracting_dims=\{(\d)\}",
    hlo,
  )
  # Per query block: forward 2, backward 4 (it keeps the forward's probabilities).
  assert len(dots) >= 6 * 4, len(dots)
  assert [d for shape, d in dots if int(d) != shape.count(",")] == []


@pytest.mark.parametrize("window", [64, 20])
def test_row_schedule_keeps_the_softmax_numpy_computes(window, monkeypatch):
  """What the row schedule's forward pass keeps for the backward pass, each block's
  exponentials scaled by 1 / their row sums, is the softmax NumPy computes over the keys
  the window allows, laid out [B, K, C*G, R] (rows: positions major, a kv head's G query
  heads minor). With less room than those bytes it keeps nothing."""
  b, t, n, kv, h, c = 2, 64, 4, 2, 8, 16
  g = n // kv
  q, k, v, _ = _inputs(b, t, n, kv, h, n_docs=1, seed=3)
  ranges = chunked.row_ranges(chunked.block_pairs(t // c, t // c, c, window), t // c)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  q_op = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, h)
  seg, idx = jnp.ones((b, t), jnp.int32), jnp.arange(t, dtype=jnp.int32)
  sched = chunked.Schedule(c, g, window, ranges=ranges)
  x = chunked.Operands(q_op, heads_first(k), heads_first(v), seg, seg, idx, idx)
  fwd = lambda keep=True: chunked._rowwise_fwd(sched._replace(keep_probs=keep), x)[1][-1]
  exps, inv_l = fwd()
  assert sum(e.nbytes for e in exps) == chunked._probs_bytes(sched, q_op)
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for i, (lo, hi) in enumerate(ranges):
    got = np.asarray(exps[i]) * np.asarray(inv_l)[:, :, i * c * g : (i + 1) * c * g, None]
    want = np.zeros(got.shape)
    for r in range(c * g):
      pos, head = i * c + r // g, r % g
      keys = np.arange(lo * c, hi * c)
      seen = (keys <= pos) & (keys > pos - window)
      for kh in range(kv):
        s = kn[:, keys[seen], kh] @ qn[:, pos, kh * g + head][..., None] / np.sqrt(h)
        e = np.exp(s[..., 0] - s.max(axis=1))
        want[:, kh, r, seen] = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  assert fwd(keep=False) is None
  monkeypatch.setattr(chunked, "KEEP_PROBS_BYTES", chunked._probs_bytes(sched, q_op) - 1)
  assert fwd() is None


@pytest.mark.speed_check
def test_scanned_layers_do_not_keep_attention_probabilities(monkeypatch):
  """Under scanned layers the model does not ask the row schedule to keep its probabilities
  (the scan would stack them, and the switch over windows keep every branch's): the
  compiled train step needs the same temporaries with keeping allowed or not.
  Speed check: it reads XLA:CPU's buffer assignment, so an XLA upgrade that trips it is a
  memory regression, not a wrong result."""
  import optax
  from flax import nnx

  from cwm_jax.model import init_model
  from cwm_jax.model.config import tiny
  from cwm_jax.train.step import make_train_step

  cfg = tiny()
  b, t = 2, 128
  tokens = jnp.ones((b, t), jnp.int32)
  batch = {
    "inputs": tokens,
    "targets": tokens,
    "weights": jnp.ones((b, t), jnp.float32),
    "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
    "segment_ids": tokens,
  }
  tx = optax.sgd(0.1)

  def temp_bytes(keep_bytes):
    monkeypatch.setattr(chunked, "KEEP_PROBS_BYTES", keep_bytes)
    ex = Execution(scan_layers=True)
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0, ex), nnx.Param))
    state = {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jnp.zeros((2,), jnp.uint32),
    }
    step = jax.jit(make_train_step(cfg, tx, lambda s: 0.1, execution=ex))
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(64 << 20) == temp_bytes(0)


def test_chunked_never_mixes_documents():
  # Changing document 1's keys must not change document 2's outputs.
  q, k, v, _ = _inputs(1, 32, 4, 2, 8, n_docs=1)
  seg = jnp.asarray([[1] * 12 + [2] * 20], jnp.int32)
  attn = jax.jit(lambda k: kernels.attend(q, k, v, seg, window=16, impl="chunked", chunk=8))
  moved = attn(k.at[:, :12].multiply(-3.0))
  np.testing.assert_array_equal(np.asarray(attn(k))[:, 12:], np.asarray(moved)[:, 12:])


@pytest.mark.parametrize("t,w,c,offset", [(37, 9, 8, 0), (64, 20, 8, 0), (16, 11, 4, 12)])
def test_block_pairs_cover_exactly_the_blocks_with_allowed_pairs(t, w, c, offset):
  nq, nk = -(-t // c), -(-(t + offset) // c)
  qi, ki = np.arange(nq * c)[:, None] + offset, np.arange(nk * c)[None, :]
  mask = np.asarray(allowed(qi, ki, 0, 0, w))
  needed = {
    (i, j)
    for i in range(nq)
    for j in range(nk)
    if mask[i * c : (i + 1) * c, j * c : (j + 1) * c].any()
  }
  assert set(block_pairs(nq, nk, c, w, offset)) == needed


def test_block_pairs_are_near_ideal_for_cwm_local_layers():
  t, w, c = 32768, 8192, 512
  computed = len(block_pairs(t // c, t // c, c, w)) * c * c
  assert causal_pairs(t, w) == sum(min(i + 1, w) for i in range(t))
  assert computed / causal_pairs(t, w) < 1.1


def test_cudnn_module_xla_path_matches_reference():
  q, k, v, seg = _inputs(2, 24, 4, 2, 8, n_docs=3)
  for w in (6, 24):
    ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=w, impl="reference")
    xla = lambda q, k, v: kernels.cudnn_attention(q, k, v, seg, window=w, implementation="xla")
    _assert_close(
      jax.jit(lambda *a: _value_and_grads(xla, *a))(q, k, v),
      jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v),
      atol=2e-6,
    )


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_reference_on_gpu():
  q, k, v, seg = (
    x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
    for x in _inputs(2, 256, 8, 2, 64, n_docs=3)
  )
  for w in (64, 256):
    got = kernels.attend(q, k, v, seg, window=w, impl="cudnn")
    want = kernels.attend(q, k, v, seg, window=w, impl="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


def test_cudnn_off_gpu_is_a_clear_error():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  q, k, v, seg = _inputs(1, 8, 2, 1, 8, n_docs=1)
  with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
    kernels.attend(q, k, v, seg, window=4, impl="cudnn")


def test_splash_interpret_matches_reference():
  # Pallas interpret mode is slow: one 128-row block, local window, GQA, 3 documents.
  q, k, v, seg = _inputs(1, 128, 4, 2, 128, n_docs=3)
  splash = lambda q, k, v: kernels.attend(q, k, v, seg, window=40, impl="splash", chunk=128)
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=40, impl="reference")
  _assert_close(_value_and_grads(splash, q, k, v), _value_and_grads(ref, q, k, v), atol=1e-5)


@pytest.mark.parametrize("t, window", [(56, 20), (56, 56), (200, 150)])
def test_splash_pads_other_lengths_to_its_tiles(t, window):
  """Lengths that are not a multiple of splash's 128-row tiles (a sampler's prefill, a
  short sequence) run padded: outputs and gradients equal the dense reference's."""
  q, k, v, seg = _inputs(1, t, 4, 2, 16, n_docs=3)
  splash = lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="splash")
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="reference")
  _assert_close(_value_and_grads(splash, q, k, v), _value_and_grads(ref, q, k, v), atol=1e-5)


def test_config_names_the_attention_choices():
  assert Execution(attention_impl="splash", global_attention_impl="chunked").global_attention_impl
  with pytest.raises(ConfigError, match="attention_impl='flash' must be one of"):
    Execution(attention_impl="flash")
  with pytest.raises(ConfigError, match="context_parallel='halo' must be one of"):
    Execution(context_parallel="halo")
