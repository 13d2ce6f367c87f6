"""The CWM decoder: pre-norm blocks, a scanned layer stack, untied head.

Legend: B batch, T length, D model, V vocab, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cwm_jax.model.attention import Attention
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.layers import MLP, Embed, RMSNorm, constrain, dtype_of, param

_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def remat(fn, policy: str):
  """Wraps `fn` in jax.checkpoint with a named policy ('none' leaves it)."""
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=_POLICIES[policy], prevent_cse=False)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, execution: Execution, rngs: nnx.Rngs):
    pd = dtype_of(execution.param_dtype)
    self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd, rngs)
    self.attention = Attention(cfg, execution, rngs)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd, rngs)
    self.mlp = MLP(cfg.dim, cfg.ffn_dim, pd, rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, window, windows=None):
    h = self.attention(self.attention_norm(x_BTD), positions_BT, segment_ids_BT,
                       window, windows)
    x_BTD = constrain(x_BTD + h, ("batch", "seq", "act_embed"))
    x_BTD = x_BTD + self.mlp(self.ffn_norm(x_BTD))
    return constrain(x_BTD, ("batch", "seq", "act_embed"))


class Transformer(nnx.Module):
  """CWM decoder-only LM. Layers are stacked on a leading 'layers' axis.

  `cfg` is the architecture, `execution` how it runs (dtypes, backend, scan,
  remat); only `execution.param_dtype` affects the parameters themselves.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution = Execution()):
    self.cfg, self.execution = cfg, execution
    pd = dtype_of(execution.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.dim, pd, rngs)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return Block(cfg, execution, rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps, pd, rngs)
    self.lm_head = param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), pd)

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    cfg, run = self.cfg, self.execution
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.zeros((b, t), jnp.int32)
    x_BTD = constrain(self.embed(tokens_BT, dtype_of(run.compute_dtype)),
                      ("batch", "seq", "act_embed"))
    graphdef, stacked = nnx.split(self.layers)

    def apply(x, layer_state, window, windows=None):
      return nnx.merge(graphdef, layer_state)(x, positions_BT, segment_ids_BT, window, windows)

    if run.scan_layers:
      windows = tuple(sorted(set(cfg.layer_windows)))
      index_L = jnp.asarray([windows.index(w) for w in cfg.layer_windows], jnp.int32)
      body = remat(lambda x, xs: (apply(x, xs[0], xs[1], windows), None), run.remat_policy)
      x_BTD, _ = jax.lax.scan(body, x_BTD, (stacked, index_L))
    else:
      for i, w in enumerate(cfg.layer_windows):
        layer_i = jax.tree.map(lambda a, i=i: a[i], stacked)
        x_BTD = remat(functools.partial(apply, window=w), run.remat_policy)(x_BTD, layer_i)
    return self.norm(x_BTD)

  def logits(self, h_BTD):
    """Float32 logits [B, T, V] from hidden states."""
    logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, self.lm_head[...].astype(h_BTD.dtype),
                            preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Float32 logits [B, T, V]; positions and segment ids default to one document."""
    return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT))


def init_model(cfg: ModelConfig, seed: int = 0, execution: Execution = Execution()
              ) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed), execution)


def abstract_model(cfg: ModelConfig, execution: Execution = Execution()) -> Transformer:
  """The model's structure with ShapeDtypeStruct leaves; allocates nothing."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0), execution))


def model_from_params(cfg: ModelConfig, params: dict, execution: Execution = Execution()
                      ) -> Transformer:
  """A model holding `params` (a nested dict of arrays, as `nnx.state(m).to_pure_dict()`),
  cast to `execution.param_dtype`."""
  graphdef, state = nnx.split(abstract_model(cfg, execution))
  dtype = dtype_of(execution.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
  return nnx.merge(graphdef, state)
