"""The sampler's KV cache: one ring buffer per distinct attention window.

The cache lives with the model (`cwm_jax.model.cache`), whose attention writes
and reads it inside the same forward pass that training runs; this module is
the name inference code uses for it.
"""

from cwm_jax.model.cache import (
  CACHE_AXES,
  CacheLayout,
  KVCache,
  LayerCache,
  by_layer,
  by_window,
  cache_bytes,
  cache_layout,
  cache_shardings,
  distinct_windows,
  init_cache,
  slot_columns,
)

__all__ = [
  "CACHE_AXES",
  "CacheLayout",
  "KVCache",
  "LayerCache",
  "by_layer",
  "by_window",
  "cache_bytes",
  "cache_layout",
  "cache_shardings",
  "distinct_windows",
  "init_cache",
  "slot_columns",
]
