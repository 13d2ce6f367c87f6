"""Mesh resolution, logical-to-mesh rules and the 32B PartitionSpec snapshot."""

import json
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from cwm_jax.model import config as model_config
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cwm_32b_param_specs.json")


def _spec_json(spec: P) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def _flat_specs(cfg) -> dict[str, list]:
  specs = sharding.param_specs(cfg, sharding.DEFAULT_RULES)
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  return {"/".join(k.key for k in path): _spec_json(s) for path, s in flat}


def test_mesh_shape_fills_minus_one():
  assert mesh_lib.mesh_shape(dict(data=1, fsdp=-1, tensor=2, sequence=1), 8) == (1, 4, 2, 1)
  assert mesh_lib.mesh_shape(dict(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)


@pytest.mark.parametrize(
  "sizes, fields",
  [
    (dict(data=3, fsdp=-1), "mesh.data=3"),
    (dict(data=2, fsdp=2, tensor=1, sequence=1), "product 4 != 8"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
  ],
)
def test_mesh_errors_name_fields(sizes, fields):
  with pytest.raises(mesh_lib.MeshError, match=fields.replace("*", r"\*")):
    mesh_lib.mesh_shape(sizes, 8)


def test_make_mesh_axes_and_types():
  mesh = mesh_lib.make_mesh(dict(fsdp=4, tensor=2))
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert dict(mesh.shape) == dict(data=1, fsdp=4, tensor=2, sequence=1)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_tiny_specs_follow_rules():
  specs = sharding.param_specs(model_config.tiny(), sharding.DEFAULT_RULES)
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  assert specs["layers"]["attention"]["wq"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["mlp"]["w2"] == P(None, "tensor", "fsdp")
  assert specs["norm"]["scale"] == P("fsdp")
  assert specs["layers"]["ffn_norm"]["scale"] == P(None, "fsdp")
  rules = [("embed", ("data", "fsdp")), ("vocab", None)]
  assert sharding.param_specs(model_config.tiny(), rules)["lm_head"] == P(("data", "fsdp"), None)
  assert sharding.batch_spec(sharding.DEFAULT_RULES) == P(("data", "fsdp"), "sequence")


def test_indivisible_names_param_and_axes():
  shapes = {"w": jax.ShapeDtypeStruct((6, 4), "float32")}
  errors = sharding.indivisible(shapes, {"w": P("fsdp", None)}, dict(fsdp=4))
  assert len(errors) == 1 and "param w dim 6" in errors[0] and "fsdp" in errors[0]


def test_cwm_32b_specs_golden_and_fsdp():
  """Every 2+-dim parameter of the 32B model is sharded over fsdp (no allocation)."""
  cfg = model_config.cwm_32b()
  got = _flat_specs(cfg)
  assert len(got) == 12
  for name, spec in got.items():
    if len(spec) >= 2:
      assert any("fsdp" in (e if isinstance(e, list) else [e]) for e in spec), name
  if os.environ.get("CWM_REGOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    assert got == json.load(f), "32B PartitionSpecs changed; CWM_REGOLDEN=1 rewrites the snapshot"
