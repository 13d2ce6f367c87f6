"""Logical-to-mesh sharding: parameter specs, batch specs, divisibility checks.

Model code names only logical axes; the table mapping them to mesh axes
(`rules`, a sequence of `(logical, mesh_axis | tuple | None)`) lives in the
run config. `DEFAULT_RULES` is the FSDP x tensor layout used by the configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.model.config import ModelConfig
from cwm_jax.model.layers import logical_to_spec
from cwm_jax.model.transformer import abstract_model

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # Parameters: every one of 2+ dims is split over fsdp (ZeRO-3), matrices
  # also over tensor; norm scales (stacked [L, D]) follow fsdp too.
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("norm", "fsdp"),
  ("layers", None),
  # Activations.
  ("batch", ("data", "fsdp")),
  ("seq", "sequence"),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


def normalize_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Rules as hashable tuples (config files may hold lists)."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if len(axes) != 1 else axes[0]
    out.append((str(name), axes))
  return tuple(out)


def param_logical_names(cfg: ModelConfig) -> dict:
  """Pure dict (same structure as the params) of logical-name tuples."""
  _, state = nnx.split(abstract_model(cfg), nnx.Param)
  names = jax.tree.map(
    lambda v: v.get_metadata()["out_sharding"], state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return nnx.to_pure_dict(names)


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, str) or n is None for n in x)


def param_specs(cfg: ModelConfig, rules: Rules) -> dict:
  """PartitionSpec of every parameter under `rules`."""
  rules = normalize_rules(rules)
  return jax.tree.map(
    lambda n: logical_to_spec(n, rules), param_logical_names(cfg), is_leaf=_is_names
  )


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules: Rules) -> P:
  """Spec of a [B, T] batch array."""
  return logical_to_spec(("batch", "seq"), normalize_rules(rules))


def spec_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def indivisible(shapes, specs, mesh_sizes: dict) -> list[str]:
  """Parameters whose dims are not divisible by their mesh axes, as messages."""
  errors = []
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, shape), spec in zip(flat_shapes, flat_specs):
    for dim, entry in zip(shape.shape, spec):
      size = math.prod(mesh_sizes[a] for a in spec_axes(entry))
      if dim % size:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        errors.append(
          f"param {name} dim {dim} not divisible by mesh axes {spec_axes(entry)} (size {size})"
        )
  return errors
