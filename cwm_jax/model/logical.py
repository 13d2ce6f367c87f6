"""Activations' logical axis names, mapped to the mesh.

`constrain` maps activation names to the mesh through the rules set by
`nnx.logical_axis_rules` (if any); without a mesh and rules it does nothing.
"""

from __future__ import annotations

import jax
from flax.core import spmd as flax_spmd
from flax.linen import logical_to_mesh_axes


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


def mesh_splits(axis: str) -> bool:
  """Whether the current mesh splits `axis` over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh is not None and not mesh.empty and dict(mesh.shape).get(axis, 1) > 1
