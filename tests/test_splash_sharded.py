"""Splash attention sharded over a mesh of 8 simulated CPU devices (Pallas
interpret mode, float32) equals the dense reference: outputs and gradients,
batch over data/fsdp, query heads over tensor, kv heads sharded, replicated
or regrouped (GQA), local and global layers, packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax import kernels
from cwm_jax.kernels import splash
from cwm_jax.parallel.mesh import make_mesh

# Packed documents crossing the 128-row kernel blocks, and padding (segment 0).
SEGMENTS = np.array(
  [[1] * 100 + [2] * 90 + [3] * 60 + [0] * 6, [1] * 5 + [2] * 200 + [3] * 51], np.int32
)


def _inputs(n, k, seed=0):
  rng = np.random.default_rng(seed)
  b, t = SEGMENTS.shape
  q = jnp.asarray(rng.normal(size=(b, t, n, 8)), jnp.float32)
  kk, v = (jnp.asarray(rng.normal(size=(b, t, k, 8)), jnp.float32) for _ in range(2))
  return q, kk, v, jnp.asarray(SEGMENTS), jnp.asarray(rng.normal(size=q.shape), jnp.float32)


def _outputs(attn, q, k, v, proj):
  loss = lambda q, k, v: jnp.sum(attn(q, k, v) * proj)
  return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, atol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0)


@pytest.mark.parametrize(
  "mesh_sizes, n, k",
  [
    ({"data": 2, "tensor": 4}, 4, 2),  # one query head per shard, K replicated
    ({"data": 2, "fsdp": 2, "tensor": 2}, 4, 2),  # B=2 over data only; K sharded
    ({"fsdp": 4, "tensor": 2}, 6, 3),  # 3 query heads per shard span 2 kv heads
  ],
)
def test_sharded_splash_matches_reference(mesh_sizes, n, k):
  mesh = make_mesh(mesh_sizes, jax.devices()[:8])
  q, kk, v, seg, proj = _inputs(n, k)
  windows = (150, 256)  # local (spans 128-row blocks) and global (causal) layers
  with jax.set_mesh(mesh):
    q_spec, kv_spec, _ = splash.mesh_specs(mesh, 2, n, k)
    q, proj = (jax.device_put(x, NamedSharding(mesh, q_spec)) for x in (q, proj))
    kk, v = (jax.device_put(x, NamedSharding(mesh, kv_spec)) for x in (kk, v))
    got = jax.jit(
      lambda q, k, v, p: [
        _outputs(
          lambda q, k, v: splash.splash_attention(q, k, v, seg, window=w, block=128), q, k, v, p
        )
        for w in windows
      ]
    )(q, kk, v, proj)
    jaxpr = str(
      jax.make_jaxpr(lambda q, k, v: splash.splash_attention(q, k, v, seg, window=150, block=128))(
        q, kk, v
      )
    )
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  want = [
    _outputs(
      lambda q, k, v: kernels.attend(q, k, v, seg, window=w, impl="reference"), q, kk, v, proj
    )
    for w in windows
  ]
  _assert_close(got, want)


def test_fused_backward_matches_reference():
  """Splash's one-kernel backward (dq with dk, dv; `fused_bwd`): outputs and q/k/v
  gradients equal the reference's, grouped heads, documents, local and global layers."""
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  q, kk, v, seg, proj = _inputs(4, 2, seed=1)
  windows = (150, 256)
  with jax.set_mesh(mesh):
    got = jax.jit(
      lambda q, k, v, p: [
        _outputs(
          lambda q, k, v: splash.splash_attention(
            q, k, v, seg, window=w, block=128, fused_bwd=True
          ),
          q,
          k,
          v,
          p,
        )
        for w in windows
      ]
    )(q, kk, v, proj)
  want = [
    _outputs(
      lambda q, k, v: kernels.attend(q, k, v, seg, window=w, impl="reference"), q, kk, v, proj
    )
    for w in windows
  ]
  _assert_close(got, want)
  assert splash.block_sizes(256, 256, 128, fused_bwd=True).use_fused_bwd_kernel


def test_mesh_specs_and_block_fitting():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  assert splash.mesh_specs(mesh, 4, 48, 8) == (
    P(("data", "fsdp"), None, "tensor", None),
    P(("data", "fsdp"), None, "tensor", None),
    P(("data", "fsdp"), None),
  )
  # B=2 only divides data; 6 heads over tensor=2 but 3 kv heads replicated.
  assert splash.mesh_specs(mesh, 2, 6, 3)[1] == P("data", None, None, None)
  assert splash.fit_block(8192, 512, 128) == 512 and splash.fit_block(384, 512, 128) == 384
  assert splash.fit_block(1152, 512, 128) == 128
  with pytest.raises(ValueError, match="pad the sequence to a multiple of 128"):
    splash.fit_block(1000, 512, 128)
