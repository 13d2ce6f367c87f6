"""Grouped-query self-attention with RoPE and a per-layer window.

Legend: B batch, T length, D model, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from cwm_jax import kernels
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.layers import constrain, dtype_of, param
from cwm_jax.model.rope import apply_rope


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)

  def project_qkv(self, x_BTD, positions_BT):
    """Rotated queries [B,T,N,H] and keys [B,T,K,H], values [B,T,K,H]."""
    dt, cfg = x_BTD.dtype, self.cfg
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq[...].astype(dt))
    k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wk[...].astype(dt))
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wv[...].astype(dt))
    q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
    k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
    q_BTNH = constrain(q_BTNH, ("batch", "seq", "act_heads", None))
    k_BTKH = constrain(k_BTKH, ("batch", "seq", "act_kv_heads", None))
    v_BTKH = constrain(v_BTKH, ("batch", "seq", "act_kv_heads", None))
    return q_BTNH, k_BTKH, v_BTKH

  def project_out(self, o_BTNH):
    return jnp.einsum("BTNH,NHD->BTD", o_BTNH, self.wo[...].astype(o_BTNH.dtype))

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, window, windows=None):
    """Self-attention over packed rows.

    `window` is a Python int (unrolled layers) or, under scan, a traced index
    into the static tuple `windows` of the distinct windows of the model.
    """
    q, k, v = self.project_qkv(x_BTD, positions_BT)
    cfg = self.cfg

    def run(w):
      return lambda q, k, v, s: kernels.attend(q, k, v, s, window=w, impl=cfg.attention_impl,
                                              chunk=cfg.attention_chunk)

    if windows is None:
      o_BTNH = run(window)(q, k, v, segment_ids_BT)
    elif len(windows) == 1:
      o_BTNH = run(windows[0])(q, k, v, segment_ids_BT)
    else:
      o_BTNH = jax.lax.switch(window, [run(w) for w in windows], q, k, v, segment_ids_BT)
    o_BTNH = checkpoint_name(o_BTNH, "attention_out")
    return self.project_out(o_BTNH)
