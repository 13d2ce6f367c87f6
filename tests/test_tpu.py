"""Compiling for TPU slices without a TPU (libtpu's compiler, compile-only devices):
slice names, a small model's sharded train step with splash attention (the Mosaic
kernel, no T x T array), the planner's exit 2, memory linear in T for local windows."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_launch import ROOT
from test_plan import check_sampler_plan, rl_sampler_stage

from cwm_jax.base import ConfigError
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.train import planning, topology

pytest.importorskip(
  "libtpu", reason="libtpu is part of the test extra: bash launch/install.sh .venv test"
)


def test_slice_names():
  assert topology.slice_spec("v5p-512").topology == "v5p:4x8x8"  # 512 TensorCores, 256 chips
  assert topology.slice_spec("v5p-8").topology == "v5p:2x2x1"
  assert topology.slice_spec("v4-512").chips == 256
  assert topology.slice_spec("v6e-256").topology == "v6e:16x16"
  assert topology.slice_spec("v5litepod-16").topology == "v5e:4x4"
  assert topology.slice_spec("v5p:8x8x8").chips == 512
  for bad, match in (
    ("v5p-7", "TensorCores"),
    ("v6e-24", "power of two"),
    ("v9-8", "accelerator type"),
    ("v5p:4x4", "3 axes"),
  ):
    with pytest.raises(ConfigError, match=match):
      topology.slice_spec(bad)


def _small(seq_len=1024, windows=None, batch=4, impl="splash"):
  sys.path.insert(0, ROOT)
  from configs import smoke  # pylint: disable=g-import-not-at-top

  c = smoke.get_config()
  c.seq_len, c.batch_size, c.loss.chunk = seq_len, batch, 0
  c.execution.attention_impl = impl
  if windows:
    c.model.overrides.update(
      dict(
        n_layers=len(windows),
        layer_windows=list(windows),
        global_window=max(seq_len, max(windows)),
        max_seq_len=seq_len,
      )
    )
  return c


def test_small_model_train_step_compiles_for_v5p_with_mosaic_splash():
  """attention_impl='auto' picks splash for TPU devices though this process runs on CPU."""
  import jax  # pylint: disable=g-import-not-at-top

  from cwm_jax import kernels  # pylint: disable=g-import-not-at-top

  assert kernels.resolve("auto") == "chunked" and jax.default_backend() == "cpu"
  config = _small(impl="auto")
  devs = topology.devices(topology.slice_spec("v5p:2x2x1"))
  mesh = planning.slice_mesh(dict(config.mesh), devs)
  cfg = planning.model_config(config)
  step = planning.lm_step(config, cfg, mesh).step
  with jax.set_mesh(mesh):
    hlo = step.jitted.lower(*step.args).compile().as_text()
  assert mesh.devices.flat[0].device_kind == "TPU v5" and mesh.shape["fsdp"] == 4
  with jax.set_mesh(mesh):
    assert kernels.target_platform() == "tpu" and kernels.resolve("auto") == "splash"
  assert "tpu_custom_call" in hlo  # the Mosaic (Pallas) splash kernels, forward and backward
  assert not re.search(r"\b1024,1024\b", hlo)  # no dense T x T score or mask array


def test_tiny_tpu_plan_exits_2_when_it_does_not_fit():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.plan",
      "--config",
      "configs/smoke.py",
      "--topology",
      "v5p-8",
      "--config.seq_len=1024",
      "--config.batch_size=4",
      "--config.execution.attention_impl=splash",
      "--hbm_gb",
      "0.001",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 2, out.stderr[-3000:]
  plan = json.loads(out.stdout)
  assert plan["fits"] is False and plan["device_kind"] == "TPU v5" and plan["chips"] == 4
  assert plan["total_gb_per_device"] > 0.001 and plan["attention_impl"] == "splash"
  assert "does not fit 0.001 GiB per device of 1 x v5p:2x2x1" in out.stderr
  assert plan["step_seconds_at_50pct_mfu"] == pytest.approx(
    2 * plan["flops_per_step"] / (4 * 459e12)
  )
  # The TPU cost model's estimate, with the splash kernels costed (never zero).
  assert plan["estimated_mfu"] == pytest.approx(
    plan["flops_per_step"] / (4 * 459e12 * plan["estimated_step_seconds"])
  )
  assert plan["estimated_seconds_by_kind"]["attention_kernels"] > 0


def test_a_step_libtpu_refuses_for_lack_of_hbm_is_reported_as_not_fitting():
  """libtpu will not compile a program whose temporaries exceed the chip's HBM (here dense
  16k x 16k attention scores): the plan still comes back, with the compiler's figure."""
  c = _small(16384, batch=16, impl="reference")
  c.model.overrides.update(dict(global_window=16384, max_seq_len=16384))
  with pytest.raises(planning.NotFitting, match="compiler ran out of HBM") as e:
    planning.tpu_plan([("train", c)], "v5p-8")
  plan = e.value.plan
  assert plan["compile_error"].startswith("RESOURCE_EXHAUSTED") and plan["fits"] is False
  assert plan["temp_gb_per_device"] > plan["hbm_gb"] == 95.0


def test_local_window_memory_grows_linearly_in_sequence_length():
  """Per-chip temporaries of a local-window model (splash, chunked loss) at T = 8k and
  64k: a dense T x T array would make the exponent 2."""
  temps = {}
  for t in (8192, 65536):
    c = _small(t, windows=(1024, 1024))
    c.model.overrides.update(dict(dim=256, n_heads=2, n_kv_heads=1, head_dim=128, ffn_dim=512))
    c.loss.chunk = 1024
    temps[t] = planning.tpu_plan([("train", c)], "v5p:2x2x1", estimate=False)["temp_gb_per_device"]
  exponent = math.log(temps[65536] / temps[8192]) / math.log(8)
  assert 0.8 < exponent <= 1.1, temps


def test_cwm_32b_slice_variants():
  """Per-stage, per-slice layouts reach the stage configs the trainer and planner use."""
  from cwm_jax.recipe import grids, stages  # pylint: disable=g-import-not-at-top

  ((name, c),) = stages.stage_configs(
    grids.parse_config("configs/cwm_32b.py:stage=midtrain,slice=v6e-256")
  )
  assert name == "midtrain" and c.seq_len == 131072 and c.grad_accum == 8
  assert dict(c.mesh) == dict(data=1, fsdp=16, tensor=1, sequence=16)
  assert c.execution.attention_impl == "auto" and c.execution.context_parallel == "zigzag"
  assert c.execution.remat_policy == "attention"
  ((_, rl),) = stages.stage_configs(grids.parse_config("configs/cwm_32b.py:stage=rl,slice=v6e-256"))
  assert rl.stage.trainer == "rl" and rl.batch_size == 128 and rl.grad_accum == 16
  assert rl.execution.remat_policy == "full"
  assert rl.rl.rollout_devices == 128 and rl.rl.rollout_tensor == 8 and rl.rl.rollout_slots == 32
  ((_, pre),) = stages.stage_configs(grids.parse_config("configs/cwm_32b.py:stage=pretrain"))
  assert pre.grad_accum == 8 and dict(pre.mesh)["fsdp"] == 256  # default slice: v5p-512
  with pytest.raises(ConfigError, match="slice=v5p-512|v6e-256"):
    grids.parse_config("configs/cwm_32b.py:stage=sft,slice=v4-8")


def test_rl_stage_plans_the_rl_update_step():
  from cwm_jax.recipe import grids, stages  # pylint: disable=g-import-not-at-top
  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  configs = stages.stage_configs(grids.parse_config("configs/smoke.py:stage=rl"))
  plan = planning.tpu_plan(configs, "v5p-8", step_builders={"rl": rl_step_builder}, estimate=False)[
    "stages"
  ]["rl"]
  assert plan["step"] == "rl_update" and plan["fits"] and plan["device_kind"] == "TPU v5"
  # The train state (params + AdamW mu, nu) is an argument of the compiled RL step.
  assert plan["argument_gb_per_device"] >= 12 * plan["params"] / plan["devices"] / 2**30


def test_rl_stage_plans_the_sampler_steps_for_v5p():
  """The sampler's prefill and decode compiled by libtpu for 4 v5p chips (tile-aligned
  dims, so the cache argument is unpadded): split over the rows, and over the HBM given."""
  plan = check_sampler_plan(
    lambda configs, hbm_gb, builders: planning.tpu_plan(
      configs, "v5p-8", hbm_gb=hbm_gb, step_builders=builders, estimate=False
    )
  )
  assert plan["device_kind"] == "TPU v5" and plan["chips"] == 4


def test_prefill_fills_the_cache_without_gathering_its_rows():
  """Over a `sequence` axis the prefill's keys arrive split by position; writing them into
  the cache (split by rows only) must not gather every row's buffer, which gave the 32B RL
  prefill 156 GiB of temporaries per chip. Here its temporaries stay below the cache."""
  import jax  # pylint: disable=g-import-not-at-top

  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  ((_, c),) = rl_sampler_stage()  # 4 rows, 1 per (fsdp) row shard, 512-token prompts
  c.seq_len, c.batch_size, c.rl.max_new_tokens = 768, 4, 256
  c.model.overrides.update(
    dict(layer_windows=[768, 128, 128, 128] * 4, global_window=768, max_seq_len=768)
  )
  c.execution.update(
    dict(compute_dtype="float32", attention_impl="auto", context_parallel="allgather")
  )
  c.mesh.update(data=1, fsdp=4, sequence=2)
  mesh = planning.slice_mesh(dict(c.mesh), topology.devices(topology.slice_spec("v5p-16")))
  prefill = rl_step_builder(c, planning.model_config(c), mesh).extra["sampler"]["prefill"]
  with jax.set_mesh(mesh):
    memory = prefill.jitted.lower(*prefill.args).compile().memory_analysis()
  cache = prefill.info["cache_gb_per_device"] * 2**30
  assert memory.temp_size_in_bytes < cache, (memory.temp_size_in_bytes, cache)


def test_multi_slice_mesh_puts_data_across_slices():
  devs = topology.devices(topology.slice_spec("v5p-8"), num_slices=2)
  assert len(devs) == 8 and {d.slice_index for d in devs} == {0, 1}
  mesh = planning.slice_mesh({"data": 2, "fsdp": -1}, devs, num_slices=2)
  grid = mesh.devices  # [data, fsdp, tensor, sequence]
  assert mesh.shape["data"] == 2 and mesh.shape["fsdp"] == 4
  for i in range(2):  # each data index is one slice: only `data` crosses the DCN
    assert len({d.slice_index for d in grid[i].flat}) == 1
  assert grid[0].flat[0].slice_index != grid[1].flat[0].slice_index
  with pytest.raises(ConfigError, match="multiple of --num_slices=2"):
    planning.slice_mesh({"data": 1, "fsdp": -1}, devs, num_slices=2)


def test_runtime_mesh_over_two_slices_is_the_planners():
  """The trainer's mesh (mesh_lib.make_mesh over all devices) sees the slices itself and
  builds the hybrid ICI x DCN mesh that `plan --num_slices 2` compiles."""
  devs = topology.devices(topology.slice_spec("v5p-16"), num_slices=2)
  assert mesh_lib.num_slices(devs) == 2
  sizes = {"data": 4, "fsdp": -1}
  runtime_mesh = mesh_lib.make_mesh(sizes, devs)
  planned = planning.slice_mesh(sizes, devs, num_slices=2)
  assert runtime_mesh.shape == planned.shape and runtime_mesh.axis_names == planned.axis_names
  assert (runtime_mesh.devices == planned.devices).all()
  grid = runtime_mesh.devices
  assert [{d.slice_index for d in grid[i].flat} for i in range(4)] == [{0}, {0}, {1}, {1}]
  with pytest.raises(ConfigError, match="multiple of --num_slices=2"):
    mesh_lib.make_mesh({"data": 1, "fsdp": -1}, devs)
  assert mesh_lib.num_slices(jax.devices()) == 1  # CPU devices: one slice, the plain mesh


def test_half_of_every_v6e_host_compiles_collectives_over_each_mesh_axis():
  """The trainer's half of each 2x2 host is a checkerboard of the torus; laid along its
  diagonals (`mesh.share_order`), a reduction over either mesh axis or both compiles."""
  from cwm_jax.parallel import transfer  # pylint: disable=g-import-not-at-top

  devs = topology.devices(topology.slice_spec("v6e-64"))
  trainer, _ = transfer.split_devices(32, devs)
  assert {sum(d.coords) % 2 for d in trainer} == {0}
  for sizes in (dict(data=1, fsdp=4, tensor=1, sequence=8), dict(data=2, fsdp=4, sequence=4)):
    mesh = mesh_lib.make_mesh(sizes, trainer)
    x = jax.ShapeDtypeStruct(
      (256, 512), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
    )
    for axis in (0, 1, None):
      jax.jit(lambda a, axis=axis: a.sum(axis=axis)).lower(x).compile()


@pytest.mark.parametrize(
  "slice_name,hosts,kind", [("v5p-16", 2, "TPU v5"), ("v6e-16", 4, "TPU v6 lite")]
)
def test_disaggregated_rl_stage_plans_both_meshes_on_several_hosts(slice_name, hosts, kind):
  """Each host gives 2 of its 4 chips to the trainer and 2 to the rollout replicas; the
  stage validates for the slice's host count and libtpu compiles both sides. On v6e the
  halves must be checkerboards of the torus: libtpu refuses collectives over every other
  row (the first two chips of each 2x2 host)."""
  from test_plan import check_disaggregated_plan, disaggregated_rl_stage

  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  n = 2 * hosts
  stage = disaggregated_rl_stage(rollout_devices=n, trainer=n)
  plan = planning.tpu_plan(
    stage, slice_name, step_builders={"rl": rl_step_builder}, estimate=False
  )["stages"]["rl"]
  check_disaggregated_plan(plan, processes=hosts, devices=n)
  assert plan["device_kind"] == kind and plan["fits"]
