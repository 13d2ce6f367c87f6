"""Sequence-sharded attention (8 simulated devices) equals the unsharded model:
halo exchange for local layers (a halo spanning two shards), all-gather and ring
for global layers, the zigzag layout for both, packed documents crossing shard
boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cwm_jax import kernels
from cwm_jax.kernels import context_parallel as cp
from cwm_jax.kernels.context_parallel import halo_rows, sharded_attention
from cwm_jax.model import Execution, init_model, tiny
from cwm_jax.parallel.mesh import make_mesh
from cwm_jax.parallel.sharding import DEFAULT_RULES

# Documents of 20, 30, 13 tokens and one padding token: each crosses shard edges.
SEGMENTS = np.array([[1] * 20 + [2] * 30 + [3] * 13 + [0], [1] * 5 + [2] * 40 + [3] * 19], np.int32)


def _positions(seg):
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  return pos


def _assert_trees_close(got, want, atol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0)


def test_halo_rows():
  assert halo_rows(16, 8, 8) == 15  # two hops
  assert halo_rows(4, 8, 8) == 3
  assert halo_rows(100, 8, 4) == 24  # capped by the preceding shards


def test_zigzag_order_and_its_collectives():
  """Shard r holds chunks r and 2n - 1 - r (hand-derived for 2 shards of 8 rows); the
  ppermute form of the reorder equals indexing by that order, and inverts."""
  np.testing.assert_array_equal(cp.zigzag_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  with pytest.raises(ValueError, match="multiple of twice"):
    cp.zigzag_order(12, 4)
  mesh = make_mesh({"data": 2, "sequence": 4})
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 3)), jnp.float32)
  spec = P("data", "sequence", None)
  with jax.set_mesh(mesh):
    zig = jax.jit(lambda x: cp.to_zigzag(x, spec))(x)
    back = jax.jit(lambda x: cp.from_zigzag(x, spec))(zig)
  np.testing.assert_array_equal(np.asarray(zig), np.asarray(x)[:, cp.zigzag_order(64, 4)])
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


@pytest.mark.parametrize("mode", ["allgather", "zigzag"])
def test_model_with_sequence_parallelism_matches_unsharded(mode):
  # One global and one local layer (window 16 > 8 rows per shard: a two-hop halo).
  cfg = tiny(n_layers=2, layer_windows=(4096, 16))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, SEGMENTS.shape))
  seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(_positions(SEGMENTS))
  proj = jnp.cos(jnp.arange(cfg.vocab_size, dtype=jnp.float32))

  def loss(model):
    logits = model(tokens, pos, seg)
    return jnp.mean(logits * proj), logits

  step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  (_, want_logits), want_grads = step(init_model(cfg, 0, Execution(attention_impl="reference")))
  mesh = make_mesh({"sequence": 8})
  model = init_model(
    cfg, 0, Execution(attention_impl="chunked", attention_chunk=8, context_parallel=mode)
  )
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    (_, logits), grads = step(model)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, pos, seg))(state))
  # allgather: the local layer's two-hop halo of k, v and segment ids (6 ppermutes), the
  # global layer's all-gathers (3). zigzag: tokens, positions, segment ids in and the
  # hidden states out, two ppermutes each (8); both layers all-gather (6).
  want = {"allgather": (6, 3), "zigzag": (8, 6)}[mode]
  assert "shard_map" in jaxpr
  assert (jaxpr.count("ppermute["), jaxpr.count("all_gather[")) == want
  _assert_trees_close(logits, want_logits, 1e-5)
  _assert_trees_close(nnx.state(grads), nnx.state(want_grads), 1e-5)


def test_ring_and_halo_kernels_with_data_and_sequence_axes():
  mesh = make_mesh({"data": 2, "sequence": 4})
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 64, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 64, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(SEGMENTS)
  proj = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  spec, seg_spec = P("data", "sequence", None, None), P("data", "sequence")

  def outputs(attn):
    loss = lambda q, k, v: jnp.sum(attn(q, k, v) * proj)
    return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  def run(window, mode, sharded):
    if not sharded:
      return outputs(lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="reference"))
    return outputs(
      lambda q, k, v: sharded_attention(
        q,
        k,
        v,
        seg,
        window=window,
        chunk=8,
        mode=mode,
        q_spec=spec,
        kv_spec=spec,
        seg_spec=seg_spec,
      )
    )

  cases = [(64, "ring"), (40, "ring")]  # global ring; local layer with a 3-hop halo
  with jax.set_mesh(mesh):
    got = jax.jit(lambda: [run(w, m, True) for w, m in cases])()
  want = jax.jit(lambda: [run(w, m, False) for w, m in cases])()
  _assert_trees_close(got, want, 1e-5)


def _zigzag_or_not(mode, attn, q, k, v, seg, spec, seg_spec):
  """`attn` on rows in the order `mode` expects: zigzag moves them in and the output back."""
  if mode != "zigzag":
    return attn(q, k, v, seg)
  z = lambda x: cp.to_zigzag(x, spec)
  return cp.from_zigzag(attn(z(q), z(k), z(v), cp.to_zigzag(seg, seg_spec)), spec)


@pytest.mark.parametrize(
  "docs",
  [
    ([150, 200, 140, 22], [10, 300, 202]),  # 128 rows per shard
    ([150, 100, 48, 22], [10, 200, 110]),  # 80 rows per shard: splash pads them
  ],
)
@pytest.mark.parametrize("mode", ["allgather", "zigzag"])
def test_splash_inner_kernel_halo_and_allgather_match_reference(docs, mode):
  """Splash (interpret mode) as the context-parallel kernel: a local layer on the
  halo-extended block (window 200 > the rows per shard: a two- or three-hop halo) and a
  global layer over all-gathered K/V, documents crossing the shard edges; in zigzag
  mode both layers over all-gathered K/V, each half of a shard's rows at its offset
  (rows moved into zigzag order and the output back)."""
  mesh = make_mesh({"data": 2, "sequence": 4})
  rng = np.random.default_rng(2)
  t = sum(docs[0])
  q = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, t, 1, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(
    np.stack([np.repeat([1, 2, 3, 0], docs[0]), np.repeat([1, 2, 3], docs[1])]).astype(np.int32)
  )
  proj = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  spec, seg_spec = P("data", "sequence", None, None), P("data", "sequence")

  def outputs(attn):
    loss = lambda q, k, v: jnp.sum(attn(q, k, v) * proj)
    return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  windows = (200, t)
  with jax.set_mesh(mesh):
    got = jax.jit(
      lambda: [
        outputs(
          lambda q, k, v: _zigzag_or_not(
            mode,
            lambda q, k, v, s: sharded_attention(
              q,
              k,
              v,
              s,
              window=w,
              chunk=128,
              mode=mode,
              q_spec=spec,
              kv_spec=spec,
              seg_spec=seg_spec,
              impl="splash",
            ),
            q,
            k,
            v,
            seg,
            spec,
            seg_spec,
          )
        )
        for w in windows
      ]
    )()
  want = [
    outputs(lambda q, k, v: kernels.attend(q, k, v, seg, window=w, impl="reference"))
    for w in windows
  ]
  _assert_trees_close(got, want, 1e-5)
