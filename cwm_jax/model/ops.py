"""The model's platform-specialised ops, each in an accelerator form and a CPU form.

`kernels.backend.forms()` picks the form, from the platform the step is traced for; each
op here also takes `forms` (a `backend.Forms`), so that both forms run on CPU in the
tests, against each other and a reference. The two forms of an op compute the same
values: the CPU forms only ask XLA:CPU for the computation in a shape it runs faster.

Legend: B batch, T length, D model, N query heads, K kv heads, H head dim, F ffn,
M = B*T tokens.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from cwm_jax.kernels import backend
from cwm_jax.kernels.backend import HEAD_AXIS, Forms
from cwm_jax.model.logical import constrain, mesh_splits


def _forms(forms: Forms | None) -> Forms:
  return backend.forms() if forms is None else forms


def dense(x, w, n_in: int = 1, preferred_element_type=None, forms: Forms | None = None):
  """`x [..., *in] . w [*in, *out] -> [..., *out]`, contracting the last `n_in` dims of x.

  CPU form (`Forms.merged_gemms`): the token dims are merged first, so the matmul and
  its weight gradient are plain 2-D GEMMs: XLA:CPU turns a weight gradient that
  contracts two token dims (B and T) into a physical transpose of the activation
  gradient, fused with its elementwise producers, which made the train step's MLP
  several times slower (benchmarks/train_step.py). Accelerator form: the same
  contraction unmerged, which keeps batch and sequence shardings intact.

  A `preferred_element_type` wider than x's dtype (float32 logits from bfloat16
  activations) widens the output only: the backward pass casts the wide cotangent
  to x's dtype before its two matmuls (float32 accumulation), as JAX's own
  transpose would otherwise run them with one float32 operand, i.e. as float32
  (TF32 on GPUs) matmuls at about half the bf16 rate (benchmarks/gpu_mfu.py).
  """
  merged = _forms(forms).merged_gemms
  w = w.astype(x.dtype)
  if preferred_element_type is None or jnp.dtype(preferred_element_type) == x.dtype:
    return _contract(x, w, n_in, preferred_element_type, merged)
  return _dense_wide(x, w, n_in, jnp.dtype(preferred_element_type), merged)


def _contract(x, w, n_in: int, preferred_element_type, merged: bool):
  if not merged:
    return jnp.tensordot(x, w, n_in, preferred_element_type=preferred_element_type)
  lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  y = jnp.dot(
    x.reshape(math.prod(lead), math.prod(ins)),
    w.reshape(math.prod(ins), math.prod(outs)),
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(*lead, *outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_wide(x, w, n_in, out_dtype, merged):
  return _contract(x, w, n_in, out_dtype, merged)


def _dense_wide_fwd(x, w, n_in, out_dtype, merged):
  return _contract(x, w, n_in, out_dtype, merged), (x, w)


def _dense_wide_bwd(n_in, out_dtype, merged, res, g):
  x, w = res
  g = g.astype(x.dtype)
  n_out, lead = w.ndim - n_in, x.ndim - n_in
  w_T = jnp.moveaxis(w, tuple(range(n_in)), tuple(range(n_out, w.ndim)))  # [*out, *in]
  dx = _contract(g, w_T, n_out, out_dtype, merged)
  if merged:  # one 2-D GEMM, as in `_contract`
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


def swiglu(x_BTD, w1_DF, w3_DF, w2_FD, forms: Forms | None = None):
  """w2(silu(w1 x) * w3 x), in x's dtype.

  CPU form (`Forms.merged_gemms`): one [M, .] view throughout, as XLA:CPU fuses the
  SwiGLU elementwise ops poorly across a bitcast between 2-D GEMM outputs and 3-D
  activations. Accelerator form: [B, T, F] hidden activations, sharded by their
  logical names."""
  forms = _forms(forms)
  if forms.merged_gemms:
    dt, x_MD = x_BTD.dtype, x_BTD.reshape(-1, x_BTD.shape[-1])
    h_MF = jax.nn.silu(x_MD @ w1_DF.astype(dt)) * (x_MD @ w3_DF.astype(dt))
    return (h_MF @ w2_FD.astype(dt)).reshape(x_BTD.shape)
  gate_BTF, up_BTF = dense(x_BTD, w1_DF, forms=forms), dense(x_BTD, w3_DF, forms=forms)
  h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "act_mlp"))
  return dense(h_BTF, w2_FD, forms=forms)


def rotate_half(x_BTNH, cos_BT1h, sin_BT1h, forms: Forms | None = None):
  """Rotate-half RoPE: pairs (i, i + H/2) of `x_BTNH` (float32) rotated by the angles
  whose cosines and sines are [B, T, 1, H/2].

  Accelerator form: split the halves and concatenate the rotated ones. CPU form
  (`Forms.rope_by_flip`): the halves swap by reversing a size-2 axis, which XLA fuses
  into the elementwise work, forward and backward: the split/concatenate form and its
  gradient cost a noticeable share of a small model's train step in copies, and a
  product with a 0/1 permutation matrix costs GEMM time on every layer (projections +
  RoPE, fwd + bwd; benchmarks/train_step.py --breakdown)."""
  cos, sin = cos_BT1h, sin_BT1h
  if not _forms(forms).rope_by_flip:
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  head_dim = x_BTNH.shape[-1]
  cos2, sin2 = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)
  halves = x_BTNH.reshape(*x_BTNH.shape[:-1], 2, head_dim // 2)
  swapped = jnp.flip(halves, axis=-2).reshape(x_BTNH.shape)
  return x_BTNH * cos2 + swapped * sin2


# Tokens from which `project_qkv`'s CPU form joins the three weights into one product. A
# decode step's few rows are bound by reading the weights, which the join would copy each
# step, making decode slower (benchmarks/sampler.py).
FUSED_QKV_MIN_ROWS = 256


def joins_qkv(x_BTD, forms: Forms | None = None) -> bool:
  """Whether `project_qkv` joins the weights: CPU form (`Forms.joined_qkv`), at least
  FUSED_QKV_MIN_ROWS tokens, and heads whole (joining weights split over the heads axis
  would gather them)."""
  return (
    _forms(forms).joined_qkv
    and not mesh_splits(HEAD_AXIS)
    and math.prod(x_BTD.shape[:-1]) >= FUSED_QKV_MIN_ROWS
  )


def project_qkv(x_BTD, wq_DNH, wk_DKH, wv_DKH, forms: Forms | None = None):
  """Queries [B, T, N, H], keys and values [B, T, K, H] (before RoPE): three products
  (accelerator form), or one of the joined weights (`joins_qkv`): on CPU the thin key
  and value products ([M, D] x [D, K*H]) and their gradients run below XLA:CPU's GEMM
  rate alone, and joined they run at the rate of one wide product."""
  forms = _forms(forms)
  if not joins_qkv(x_BTD, forms):
    return tuple(dense(x_BTD, w, forms=forms) for w in (wq_DNH, wk_DKH, wv_DKH))
  return joined_qkv(x_BTD, wq_DNH, wk_DKH, wv_DKH, forms)


def joined_qkv(x_BTD, wq_DNH, wk_DKH, wv_DKH, forms: Forms | None = None):
  """`project_qkv` from one product with the three weights side by side."""
  d, n, h = wq_DNH.shape
  k = wk_DKH.shape[1]
  w = jnp.concatenate(
    [wq_DNH.reshape(d, n * h), wk_DKH.reshape(d, k * h), wv_DKH.reshape(d, k * h)], axis=1
  )
  y = dense(x_BTD, w, forms=forms)
  q, kk, v = jnp.split(y, [n * h, (n + k) * h], axis=-1)
  lead = x_BTD.shape[:-1]
  return q.reshape(*lead, n, h), kk.reshape(*lead, k, h), v.reshape(*lead, k, h)
