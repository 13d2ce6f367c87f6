"""Loss against a float64 numpy reference; chunked CE; gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cwm_jax.model.config import tiny
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import abstract_model, init_model
from cwm_jax.train import config as config_lib
from cwm_jax.train import flops, optimizer
from cwm_jax.train import step as step_lib
from cwm_jax.train.synthetic import SyntheticSource

FAST = {"xla_backend_optimization_level": 0}
CFG = tiny(n_layers=2, vocab_size=128, dim=32, ffn_dim=64, n_heads=4, n_kv_heads=2)
GRAPHDEF = nnx.split(abstract_model(CFG), nnx.Param)[0]


def _params():
  init = lambda: nnx.to_pure_dict(nnx.state(init_model(CFG, 0), nnx.Param))
  return jax.jit(init, compiler_options=FAST)()


def _batch(batch_size=8, seq_len=32, prompt_fraction=0.3):
  src = SyntheticSource(
    batch_size=batch_size,
    seq_len=seq_len,
    vocab=CFG.vocab_size,
    mean_doc_len=10,
    prompt_fraction=prompt_fraction,
  )
  return next(src)


def _numpy_loss(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  tgt = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return (weights * (lse - tgt)).sum() / weights.sum(), (weights * lse**2).sum()


def test_loss_matches_numpy_and_chunking():
  params, b = _params(), _batch()
  assert 0 < b["weights"].sum() < b["weights"].size  # prompts and padding are excluded
  forward = lambda p, x: nnx.merge(GRAPHDEF, p)(x["inputs"], x["positions"], x["segment_ids"])
  logits = jax.jit(forward, compiler_options=FAST)(params, b)
  ref, ref_z = _numpy_loss(logits, b["targets"], b["weights"])
  for chunk in (0, 8):
    loss = lambda p, x, c=chunk: step_lib.loss_sums(nnx.merge(GRAPHDEF, p), x, c)
    ce, z = jax.jit(loss, compiler_options=FAST)(params, b)
    np.testing.assert_allclose(float(ce) / b["weights"].sum(), ref, rtol=1e-5)
    np.testing.assert_allclose(float(z), ref_z, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 8])
def test_fused_head_loss_matches_autodiff(chunk):
  """The CPU step's fused head + loss: same total, ce, z and gradient as autodiff of
  `loss_sums` (z-loss on, padding weights 0); differentiating its ce alone is refused."""
  params, b = _params(), _batch()
  z_loss = 1e-2
  merge = lambda p: nnx.merge(GRAPHDEF, p)

  def reference(p):
    ce, z = step_lib.loss_sums(merge(p), b)
    return ce + z_loss * z, (ce, z)

  fused = lambda p: step_lib.loss_total(merge(p), b, z_loss, chunk)
  (want, want_aux), want_g = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
  (got, got_aux), got_g = jax.jit(jax.value_and_grad(fused, has_aux=True))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_aux), np.asarray(want_aux), rtol=1e-5)
  jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-6), got_g, want_g)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(got_g)) > 0
  with pytest.raises(NotImplementedError, match="only its total"):
    jax.grad(lambda p: fused(p)[1][0])(params)


def test_grad_accumulation_equals_big_batch():
  """2 micro-batches of 4 == one batch of 8: same loss, grad norm and updated params."""
  c = config_lib.base_config()
  c.optimizer.warmup_steps = 0
  tx, schedule = optimizer.make_optimizer(c.optimizer, 10)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: 0.1 * rng.standard_normal(a.shape).astype(a.dtype),
    nnx.to_pure_dict(nnx.state(abstract_model(CFG), nnx.Param)),
  )
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "step": np.int32(0),
    "rng": np.zeros(2, np.uint32),
  }
  batch = _batch(batch_size=8)
  out = []
  for accum in (1, 2):
    fn = step_lib.make_train_step(CFG, tx, schedule, grad_accum=accum, z_loss=1e-3)
    new, metrics = jax.jit(fn, compiler_options=FAST)(state, batch)
    out.append((jax.device_get(new["params"]), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = out
  for k in ("loss", "z_loss", "grad_norm", "weight_sum"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p2)
  assert m1["loss"] > 0 and m1["grad_norm"] > 0


def test_decay_mask_excludes_norms_and_embeddings():
  params = nnx.to_pure_dict(nnx.state(abstract_model(CFG), nnx.Param))
  mask = optimizer.decay_mask(params)
  assert mask["layers"]["attention"]["wq"] and mask["lm_head"] and mask["layers"]["mlp"]["w2"]
  assert not mask["embed"]["embedding"] and not mask["norm"]["scale"]
  assert not mask["layers"]["attention_norm"]["scale"] and not mask["layers"]["ffn_norm"]["scale"]


@pytest.mark.parametrize(
  "name, expect",
  [
    # lr=1, warmup 2, 10 steps, floor 0.1: hand-derived values at steps 0, 1, 2, 6, 10.
    ("cosine", [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8)), 0.1]),
    ("linear", [0.0, 0.5, 1.0, 1.0 - 0.9 * 4 / 8, 0.1]),
    ("wsd", [0.0, 0.5, 1.0, 1.0, 0.1]),  # decay over the last 2 steps (decay_fraction 0.2)
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
  ],
)
def test_schedules(name, expect):
  c = config_lib.base_config().optimizer
  c.update(dict(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.2, schedule=name))
  sched = optimizer.make_schedule(c, 10)
  got = [float(sched(s)) for s in (0, 1, 2, 6, 10)]
  np.testing.assert_allclose(got, expect, atol=1e-6)
  if name == "wsd":
    np.testing.assert_allclose(float(sched(9)), 0.55, atol=1e-6)


def test_dot_flops_counts_nested_products_by_hand():
  x, w = jnp.ones((4, 5)), jnp.ones((5, 6))
  f = lambda x, w: jnp.sum(jnp.tanh(x @ w))
  prod = 2 * 4 * 5 * 6  # one [4, 5] x [5, 6] product
  assert flops.dot_flops(jax.make_jaxpr(f)(x, w)) == prod
  assert flops.dot_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w)) == 3 * prod
  remat = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1)))  # forward recomputed
  assert flops.dot_flops(jax.make_jaxpr(remat)(x, w)) == 4 * prod

  def g(x, w):
    c, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w[:, :5]), None), x, None, length=3)
    return jax.lax.cond(c.sum() > 0, lambda c: jnp.sum(c @ w), jnp.sum, c)

  assert flops.dot_flops(jax.make_jaxpr(g)(x, w)) == 3 * (2 * 4 * 5 * 5) + prod


def test_dot_flops_of_the_train_step_match_the_hand_count():
  # Reference attention (dense T x T scores) and float32 on CPU: every product of the
  # step by hand. Per layer: q/k/v/o and the MLP at 6 FLOPs per weight per token
  # (forward, input and weight gradients: layer 0's input gradient feeds the embedding);
  # attention's 2 forward and 4 backward [T, T] products per head (RoPE's half swap is
  # no product). Plus the head, 6 * D * V.
  execution = Execution(attention_impl="reference", scan_layers=False)
  b, t = 2, 16
  d, n, k, h = CFG.dim, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
  f, v = CFG.ffn_dim, CFG.vocab_size
  tx = optax.adamw(1e-3)
  fn = step_lib.make_train_step(CFG, tx, lambda s: 0.0, execution=execution)
  params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(init_model(CFG, 0), nnx.Param)))
  state = {
    "params": params,
    "opt_state": jax.eval_shape(tx.init, params),
    "step": jax.ShapeDtypeStruct((), np.int32),
    "rng": jax.ShapeDtypeStruct((2,), np.uint32),
  }
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch(b, t))
  m = b * t
  per_layer = 6 * m * (d * h * (2 * n + 2 * k) + 3 * d * f) + 12 * b * n * t * t * h
  expected = CFG.n_layers * per_layer + 6 * m * d * v
  assert flops.dot_flops(jax.make_jaxpr(fn)(state, batch)) == expected
