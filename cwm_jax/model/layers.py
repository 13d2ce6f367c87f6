"""Building blocks: parameters with logical axes, RMSNorm, embedding, SwiGLU.

Legend: B batch, T query length, S key length, D model, N query heads,
K kv heads, G queries per kv head, H head dim, F ffn, V vocab, L layers.
Parameters carry logical axis names only; `constrain` maps activation names
to the mesh through the rules set by `nnx.logical_axis_rules` (if any).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from flax.linen import logical_to_mesh_axes

from cwm_jax.kernels.backend import target_platform

INIT_STD = 0.02


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def param(rngs: nnx.Rngs, shape, names, dtype, init=None) -> nnx.Param:
  """A parameter annotated with logical axis `names` (no eager sharding)."""
  init = init or nnx.initializers.normal(INIT_STD)
  return nnx.Param(
    init(rngs.params(), shape, dtype), out_sharding=tuple(names), eager_sharding=False
  )


def logical_to_spec(names, rules) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a PartitionSpec under `rules` (Flax's own mapping)."""
  return logical_to_mesh_axes(tuple(names), rules)


def constrain(x, names):
  """Sharding constraint from logical names; a no-op without mesh and rules."""
  rules = flax_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names, rules)
  spec = jax.sharding.PartitionSpec(*[_only_mesh_axes(a, mesh) for a in spec])
  return jax.lax.with_sharding_constraint(x, spec)


def _only_mesh_axes(axes, mesh):
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, str) else axes
  kept = tuple(a for a in axes if a in mesh.axis_names)
  return kept[0] if len(kept) == 1 else (kept or None)


def dense(x, w, n_in: int = 1, preferred_element_type=None):
  """`x [..., *in] . w [*in, *out] -> [..., *out]`, contracting the last `n_in` dims of x.

  On CPU targets the token dims are merged first, so the matmul and its weight
  gradient are plain 2-D GEMMs: XLA:CPU turns a weight gradient that contracts two
  token dims (B and T) into a physical transpose of the activation gradient, fused
  with its elementwise producers, which made the train step's MLP several times slower
  (benchmarks/train_step.py). Other platforms get the same contraction unmerged,
  which keeps batch and sequence shardings intact.

  A `preferred_element_type` wider than x's dtype (float32 logits from bfloat16
  activations) widens the output only: the backward pass casts the wide cotangent
  to x's dtype before its two matmuls (float32 accumulation), as JAX's own
  transpose would otherwise run them with one float32 operand, i.e. as float32
  (TF32 on GPUs) matmuls at about half the bf16 rate (benchmarks/gpu_mfu.py).
  """
  w = w.astype(x.dtype)
  if preferred_element_type is None or jnp.dtype(preferred_element_type) == x.dtype:
    return _contract(x, w, n_in, preferred_element_type)
  return _dense_wide(x, w, n_in, jnp.dtype(preferred_element_type))


def _contract(x, w, n_in: int, preferred_element_type):
  if target_platform() != "cpu":
    return jnp.tensordot(x, w, n_in, preferred_element_type=preferred_element_type)
  lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  y = jnp.dot(
    x.reshape(math.prod(lead), math.prod(ins)),
    w.reshape(math.prod(ins), math.prod(outs)),
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(*lead, *outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_wide(x, w, n_in, out_dtype):
  return _contract(x, w, n_in, out_dtype)


def _dense_wide_fwd(x, w, n_in, out_dtype):
  return _contract(x, w, n_in, out_dtype), (x, w)


def _dense_wide_bwd(n_in, out_dtype, res, g):
  x, w = res
  g = g.astype(x.dtype)
  n_out, lead = w.ndim - n_in, x.ndim - n_in
  w_T = jnp.moveaxis(w, tuple(range(n_in)), tuple(range(n_out, w.ndim)))  # [*out, *in]
  dx = _contract(g, w_T, n_out, out_dtype)
  if target_platform() == "cpu":  # one 2-D GEMM, as in `_contract`
    ins, outs = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
    dw = jnp.dot(
      x.reshape(-1, ins).T, g.reshape(-1, outs), preferred_element_type=out_dtype
    ).reshape(w.shape)
  else:
    dw = jnp.tensordot(
      x, g, (tuple(range(lead)), tuple(range(lead))), preferred_element_type=out_dtype
    )
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_wide.defvjp(_dense_wide_fwd, _dense_wide_bwd)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ("norm",), param_dtype, nnx.initializers.ones)

  def __call__(self, x_BTD):
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, param_dtype, rngs: nnx.Rngs):
    self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)

  def __call__(self, tokens_BT, dtype):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(dtype)


class MLP(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""

  def __init__(self, dim: int, hidden: int, param_dtype, rngs: nnx.Rngs):
    self.w1 = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)
    self.w3 = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)
    self.w2 = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype)

  def __call__(self, x_BTD):
    if target_platform() == "cpu":
      # One [B*T, .] view throughout: XLA:CPU fuses the SwiGLU elementwise ops poorly
      # across a bitcast between 2-D GEMM outputs and 3-D activations.
      dt, x_MD = x_BTD.dtype, x_BTD.reshape(-1, x_BTD.shape[-1])
      h_MF = jax.nn.silu(x_MD @ self.w1[...].astype(dt)) * (x_MD @ self.w3[...].astype(dt))
      return (h_MF @ self.w2[...].astype(dt)).reshape(x_BTD.shape)
    gate_BTF, up_BTF = dense(x_BTD, self.w1[...]), dense(x_BTD, self.w3[...])
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "act_mlp"))
    return dense(h_BTF, self.w2[...])
