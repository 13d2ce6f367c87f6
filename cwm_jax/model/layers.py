"""Building blocks: parameters with logical axes, RMSNorm, embedding, SwiGLU.

Legend: B batch, T query length, S key length, D model, N query heads,
K kv heads, G queries per kv head, H head dim, F ffn, V vocab, L layers.
Parameters carry logical axis names only; `constrain` (`model.logical`) maps
activation names to the mesh through the rules set by `nnx.logical_axis_rules` (if
any). `dense` and the MLP's SwiGLU come from `model.ops`, in the form for the platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cwm_jax.model.logical import constrain, logical_to_spec
from cwm_jax.model.ops import dense, swiglu

__all__ = [
  "INIT_STD",
  "MLP",
  "Embed",
  "RMSNorm",
  "constrain",
  "dense",
  "dtype_of",
  "logical_to_spec",
  "param",
]

INIT_STD = 0.02


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def param(rngs: nnx.Rngs, shape, names, dtype, init=None) -> nnx.Param:
  """A parameter annotated with logical axis `names` (no eager sharding)."""
  init = init or nnx.initializers.normal(INIT_STD)
  return nnx.Param(
    init(rngs.params(), shape, dtype), out_sharding=tuple(names), eager_sharding=False
  )


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
    return swiglu(x_BTD, self.w1[...], self.w3[...], self.w2[...])
