"""Grouped-query self-attention with RoPE and a per-layer window, with an optional KV cache.

Legend: B batch, T length, D model, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

from cwm_jax import kernels
from cwm_jax.kernels import context_parallel
from cwm_jax.model import cache as kv_cache
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.layers import dtype_of, param
from cwm_jax.model.logical import constrain, logical_to_spec, mesh_splits
from cwm_jax.model.ops import dense, project_qkv
from cwm_jax.model.rope import apply_rope


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, execution: Execution, rngs: nnx.Rngs):
    pd = dtype_of(execution.param_dtype)
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.cfg, self.execution = cfg, execution
    self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)

  def project_qkv(self, x_BTD, positions_BT):
    """Rotated queries [B,T,N,H] and keys [B,T,K,H], values [B,T,K,H]."""
    cfg = self.cfg
    q_BTNH, k_BTKH, v_BTKH = project_qkv(x_BTD, self.wq[...], self.wk[...], self.wv[...])
    q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
    k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
    q_BTNH = constrain(q_BTNH, ("batch", "seq", "act_heads", None))
    k_BTKH = constrain(k_BTKH, ("batch", "seq", "act_kv_heads", None))
    v_BTKH = constrain(v_BTKH, ("batch", "seq", "act_kv_heads", None))
    return q_BTNH, k_BTKH, v_BTKH

  def project_out(self, o_BTNH):
    return dense(o_BTNH, self.wo[...], n_in=2)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, window, windows=None, cache=None):
    """Self-attention over packed rows; `(out [B, T, D], cache)`.

    `window` is a Python int (unrolled layers) or, under scan, a traced index
    into the static tuple `windows` of the distinct windows of the model.
    `cache` is None (training) or the layer's `cache.LayerCache`: the new keys
    and values are written to it (row b's first `sum(segment_ids_BT[b])` tokens are
    real, the rest right padding); a prefill (empty cache) attends among the new
    tokens with the training kernels, a later block over the cached keys and its own.
    """
    q, k, v = self.project_qkv(x_BTD, positions_BT)
    if cache is not None:
      n_B = segment_ids_BT.sum(axis=-1, dtype=jnp.int32)
      if not cache.cache.empty:
        o_BTNH, cache = kv_cache.attend(cache, q, k, v, n_B)
        return self.project_out(o_BTNH), cache
      cache = kv_cache.write(cache, k, v, n_B)
    kernel_for = functools.partial(
      attention_kernel, self.cfg, self.execution, cached=cache is not None
    )
    if windows is None:
      o_BTNH = kernel_for(window)(q, k, v, segment_ids_BT)
    elif len(windows) == 1:
      o_BTNH = kernel_for(windows[0])(q, k, v, segment_ids_BT)
    else:
      kernels_W = [kernel_for(w) for w in windows]
      o_BTNH = jax.lax.switch(window, kernels_W, q, k, v, segment_ids_BT)
    return self.project_out(o_BTNH), cache


def attention_kernel(cfg: ModelConfig, execution: Execution, window: int, cached: bool = False):
  """`f(q, k, v, segment_ids) -> o` for one static window: backend by layer kind,
  through sequence-sharded context parallelism when the mesh and config ask.
  `cached` (a prefill into a KV cache) runs 'zigzag' as 'allgather': only
  `Transformer.hidden` moves its rows into zigzag order."""
  impl = execution.attention_impl
  if window >= cfg.global_window:
    impl = execution.global_attention_impl or impl
  # 'auto' -> the target devices' backend
  impl = kernels.resolve(impl, dtype=execution.compute_dtype)
  axis, mode = context_parallel.AXIS, execution.context_parallel
  if mode != "none" and mesh_splits(axis):
    mesh = jax.sharding.get_abstract_mesh()
    specs = [
      manual_spec(names, mesh, axis)
      for names in (
        ("batch", "seq", "act_heads", None),
        ("batch", "seq", "act_kv_heads", None),
        ("batch", "seq"),
      )
    ]
    return functools.partial(
      context_parallel.sharded_attention,
      window=window,
      chunk=kernels.resolve_chunk(execution.attention_chunk, cfg.max_seq_len),
      mode="allgather" if cached and mode == "zigzag" else mode,
      q_spec=specs[0],
      kv_spec=specs[1],
      seg_spec=specs[2],
      axis=axis,
      impl="splash" if impl == "splash" else "chunked",
      fused_bwd=execution.splash_fused_backward,
    )
  # The row schedule's kept probabilities cost memory only under scanned layers (see
  # `chunked.KEEP_PROBS_BYTES`).
  return lambda q, k, v, s: kernels.attend(
    q,
    k,
    v,
    s,
    window=window,
    impl=impl,
    chunk=execution.attention_chunk,
    max_segments=execution.attention_max_segments,
    keep_probs=not execution.scan_layers,
    fused_bwd=execution.splash_fused_backward,
  )


def zigzag_specs(execution: Execution):
  """(rows [B, T] spec, activations [B, T, D] spec) when the model runs in zigzag order
  (`context_parallel='zigzag'` on a mesh splitting the sequence axis), else None."""
  axis = context_parallel.AXIS
  if execution.context_parallel != "zigzag" or not mesh_splits(axis):
    return None
  mesh = jax.sharding.get_abstract_mesh()
  return (
    manual_spec(("batch", "seq"), mesh, axis),
    manual_spec(("batch", "seq", "act_embed"), mesh, axis),
  )


def manual_spec(names, mesh, seq_axis):
  """PartitionSpec from the logical rules, with the sequence dim on `seq_axis`."""
  rules = flax_spmd.get_logical_axis_rules()
  spec = list(logical_to_spec(names, rules)) if rules else [None] * len(names)
  out = []
  for i, axes in enumerate(spec):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and a != seq_axis)
    out.append(seq_axis if i == 1 else (axes[0] if len(axes) == 1 else (axes or None)))
  return jax.sharding.PartitionSpec(*out)
