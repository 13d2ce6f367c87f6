"""The CWM decoder: pre-norm blocks, a scanned layer stack, untied head.

One forward pass serves training and decoding: `hidden` (packed rows, no
cache) and `hidden_cached` (ragged rows writing a `cache.KVCache`) run
the same blocks, scanned over layers with the distinct windows chosen by
`lax.switch`; the cached scan carries the whole cache.

Legend: B batch, T length, D model, V vocab, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cwm_jax.kernels import backend as kernels_backend
from cwm_jax.kernels import context_parallel as cp
from cwm_jax.model import cache as kv_cache
from cwm_jax.model.attention import Attention, zigzag_specs
from cwm_jax.model.config import ModelConfig
from cwm_jax.model.execution import Execution
from cwm_jax.model.layers import MLP, Embed, RMSNorm, constrain, dense, dtype_of, param

_KERNEL_RESIDUALS = jax.checkpoint_policies.save_only_these_names(kernels_backend.RESIDUALS)
# Every policy but 'full' keeps the attention kernels' residuals (output, log-sum-exp),
# so the backward pass never reruns the attention forward to rebuild them.
_POLICIES = {
  "full": None,
  "attention": _KERNEL_RESIDUALS,
  "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots, _KERNEL_RESIDUALS
  ),
  "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KERNEL_RESIDUALS
  ),
}


def remat(fn, policy: str, prevent_cse: bool):
  """Wraps `fn` in jax.checkpoint with a named policy ('none' leaves it). A scan body
  needs no CSE barrier (the backward loop cannot share the forward's values); unrolled
  layers do, or XLA merges the recomputed forward with the original and keeps its
  activations after all."""
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=_POLICIES[policy], prevent_cse=prevent_cse)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, execution: Execution, rngs: nnx.Rngs):
    pd = dtype_of(execution.param_dtype)
    self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd, rngs)
    self.attention = Attention(cfg, execution, rngs)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd, rngs)
    self.mlp = MLP(cfg.dim, cfg.ffn_dim, pd, rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, window, windows=None, cache=None):
    """`(x [B, T, D], cache)`: one pre-norm block; `cache` as in `Attention`."""
    h, cache = self.attention(
      self.attention_norm(x_BTD), positions_BT, segment_ids_BT, window, windows, cache
    )
    x_BTD = constrain(x_BTD + h, ("batch", "seq", "act_embed"))
    x_BTD = x_BTD + self.mlp(self.ffn_norm(x_BTD))
    return constrain(x_BTD, ("batch", "seq", "act_embed")), cache


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
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.zeros((b, t), jnp.int32)
    zigzag = zigzag_specs(self.execution)
    if zigzag:  # balanced causal work over sequence shards: rows in, hidden states out
      rows = (tokens_BT, positions_BT, segment_ids_BT)
      tokens_BT, positions_BT, segment_ids_BT = (cp.to_zigzag(a, zigzag[0]) for a in rows)
    x_BTD, _ = self._stack(self._embed(tokens_BT), positions_BT, segment_ids_BT, None)
    if zigzag:
      x_BTD = cp.from_zigzag(x_BTD, zigzag[1])
    return self.norm(x_BTD)

  def hidden_cached(self, tokens_BT, cache: kv_cache.KVCache, n_B=None, layers=None):
    """Feeds a block of tokens per row at the cache's next columns; `(hidden [B, T, D],
    cache)`. Row b's first `n_B[b]` tokens (default: all T) are real and go to
    columns (= positions) `cache.length_B[b] ..`; the rest is right padding, neither
    written nor counted, and its hidden states are meaningless. `layers` (from
    `layer_states`) runs the layers unrolled on those per-layer parameters.
    """
    layout = cache.layout
    windows = tuple(layout.window(i) for i in range(len(layout.groups)))
    if windows != tuple(self.cfg.layer_windows):
      raise ValueError(
        f"the cache's layer windows {windows} are not the model's "
        f"{tuple(self.cfg.layer_windows)}; build it with init_cache(model.cfg)"
      )
    b, t = tokens_BT.shape
    n_B = jnp.full((b,), t, jnp.int32) if n_B is None else jnp.asarray(n_B, jnp.int32)
    t_T = jnp.arange(t, dtype=jnp.int32)
    real_BT = t_T[None] < n_B[:, None]
    positions_BT = cache.length_B[:, None] + t_T[None]
    x_BTD, cache = self._stack(
      self._embed(tokens_BT), positions_BT, real_BT.astype(jnp.int32), cache, layers
    )
    return self.norm(x_BTD), cache.replace(length_B=cache.length_B + n_B, empty=False)

  def _embed(self, tokens_BT):
    x_BTD = self.embed(tokens_BT, dtype_of(self.execution.compute_dtype))
    return constrain(x_BTD, ("batch", "seq", "act_embed"))

  def layer_states(self) -> tuple:
    """Each layer's parameters, split out of the stacked ones. XLA:CPU copies a slice
    of a stacked weight each time one is taken, so a decode loop whose body slices
    (scanned or unrolled) copies the whole model's weights every step; one that slices
    before the loop and passes these in reads them in place. A split (not L index
    slices) so that the gradient of unrolled layers is one concatenate per weight, where
    slices' gradients are each padded to the stacked shape and summed: L full-size
    adds per weight (less op time in a CPU train step's profile, though the adds ran
    beside other work, so the wall-clock step barely moves)."""
    _, stacked = nnx.split(self.layers)
    n = self.cfg.n_layers
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [jnp.split(a, n, axis=0) for a in leaves]
    return tuple(treedef.unflatten([p[i][0] for p in parts]) for i in range(n))

  def _stack(self, x_BTD, positions_BT, segment_ids_BT, cache, layers=None):
    """The layer stack, scanned (windows by `lax.switch`) or unrolled, on `layers` if
    given (`layer_states`); threads `cache`."""
    cfg, execution = self.cfg, self.execution
    graphdef, stacked = nnx.split(self.layers)

    def apply(x, layer_state, window, windows=None, layer_cache=None):
      return nnx.merge(graphdef, layer_state)(
        x, positions_BT, segment_ids_BT, window, windows, layer_cache
      )

    windows = kv_cache.distinct_windows(cfg)
    index_L = jnp.asarray([windows.index(w) for w in cfg.layer_windows], jnp.int32)
    if layers is None and execution.scan_layers and cache is None:  # training: remat per layer
      body = remat(
        lambda x, xs: (apply(x, xs[0], xs[1], windows)[0], None),
        execution.remat_policy,
        prevent_cse=False,
      )
      x_BTD, _ = jax.lax.scan(body, x_BTD, (stacked, index_L))
    elif layers is None and execution.scan_layers:  # cached: the scan carries the whole cache

      def body(carry, xs):
        x, layer_cache = apply(
          carry[0], xs[0], xs[1], windows, kv_cache.LayerCache(carry[1], xs[2], xs[1])
        )
        return (x, layer_cache.cache), None

      cache = kv_cache.by_window(cache)  # groups = the switch's windows
      slot_L = jnp.asarray(cache.layout.slots, jnp.int32)
      (x_BTD, cache), _ = jax.lax.scan(body, (x_BTD, cache), (stacked, index_L, slot_L))
    else:
      layers = self.layer_states() if layers is None else layers
      for i, w in enumerate(cfg.layer_windows):
        layer_cache = (
          None
          if cache is None
          else kv_cache.LayerCache(cache, cache.layout.slots[i], cache.layout.groups[i])
        )
        fn = functools.partial(apply, window=w, layer_cache=layer_cache)
        if cache is None:
          fn = remat(fn, execution.remat_policy, prevent_cse=True)
        x_BTD, layer_cache = fn(x_BTD, layers[i])
        cache = None if layer_cache is None else layer_cache.cache
    return x_BTD, cache

  def logits(self, h_BTD):
    """Float32 logits [B, T, V] from hidden states."""
    logits_BTV = dense(h_BTD, self.lm_head[...], preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Float32 logits [B, T, V]; positions and segment ids default to one document."""
    return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT))


def init_model(cfg: ModelConfig, seed: int = 0, execution: Execution = Execution()) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed), execution)


def abstract_model(cfg: ModelConfig, execution: Execution = Execution()) -> Transformer:
  """The model's structure with ShapeDtypeStruct leaves; allocates nothing."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0), execution))


def model_from_params(
  cfg: ModelConfig, params: dict, execution: Execution = Execution()
) -> Transformer:
  """A model holding `params` (a nested dict of arrays, as `nnx.state(m).to_pure_dict()`),
  cast to `execution.param_dtype`."""
  graphdef, state = nnx.split(abstract_model(cfg, execution))
  dtype = dtype_of(execution.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
  return nnx.merge(graphdef, state)
