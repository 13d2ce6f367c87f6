"""The TPU cost-model estimate (cwm_jax.train.cost_model) checked on compile-only v5p
devices: the layer extrapolation against a full unrolled compile, and a speed floor.

The floor (tests/tpu_speed_floor.json) is a regression gate: the estimate is the
TPU compiler's deterministic cost model of the compiled program (no run, no timing,
so machine load cannot move it), and a change that makes the sharded step slower on
TPU lowers it. To update the floor after a deliberate change (a new libtpu, a
model or sharding change that is slower for a stated reason, or a speedup worth
locking in), run `python tests/test_cost_model.py` and copy its `estimated_mfu`
times (1 - `margin`) into `floor`.
"""

import functools
import json
import os
import re
import sys
import types

import jax
import pytest
from test_launch import ROOT

from cwm_jax.base import ConfigError
from cwm_jax.model import execution
from cwm_jax.train import cost_model, flops, planning, topology

pytest.importorskip(
  "libtpu", reason="libtpu is part of the test extra: bash launch/install.sh .venv test"
)

FLOOR_FILE = os.path.join(ROOT, "tests", "tpu_speed_floor.json")
TOPOLOGY = "v5p:2x2x1"


def _config(n_layers=4):
  """A small CWM-shaped step: 128-wide heads (splash's lane width), local and global
  windows, FSDP over the 4 chips, full remat, bf16; small enough to compile in seconds."""
  sys.path.insert(0, ROOT)
  from configs import smoke  # pylint: disable=g-import-not-at-top

  c = smoke.get_config("dtype=bfloat16,remat=full")
  c.seq_len, c.batch_size, c.loss.chunk = 512, 8, 0
  c.execution.attention_impl = "splash"
  windows = [512, 128] * (n_layers // 2)
  windows[-1] = 512
  c.model.overrides.update(
    dict(
      n_layers=n_layers,
      layer_windows=windows,
      global_window=512,
      max_seq_len=512,
      dim=256,
      n_heads=2,
      n_kv_heads=1,
      head_dim=128,
      ffn_dim=768,
      vocab_size=2048,
    )
  )
  return c


def _mesh(c):
  return planning.slice_mesh(dict(c.mesh), topology.devices(topology.slice_spec(TOPOLOGY)))


def _estimate(c, mesh):
  """The planner's estimate at the default matmul precision (conftest asks for 'highest',
  which Mosaic refuses for splash's bf16 dots; training never sets it)."""
  cfg = planning.model_config(c)
  step_flops = flops.flops_per_token(cfg, c.seq_len) * c.batch_size * c.seq_len
  # One layer per block (under splash a layer's XLA cost does not depend on its window).
  with jax.default_matmul_precision("default"):
    return cost_model.estimate(c, mesh, planning.lm_step, 459.0, step_flops, "splash", layers=1)


@pytest.fixture(scope="module")
def small():
  c = _config()
  mesh = _mesh(c)
  return c, mesh, _estimate(c, mesh)


def test_window_period_and_tiles():
  assert cost_model.window_period((8192, 1024, 1024, 1024) * 3 + (8192,)) == 4
  assert cost_model.window_period((7,)) == 1
  # Causal 1024 x 1024 in 512 tiles: 3 of 4 tiles; a 256 window: the 2 diagonal tiles
  # plus the one the window reaches back into.
  assert cost_model.tiles_touched(1024, 1024, 1024, 0, 512, 512) == 3
  assert cost_model.tiles_touched(1024, 1024, 256, 0, 512, 512) == 3
  # The second of two sequence shards sees all earlier keys.
  assert cost_model.tiles_touched(512, 1024, 1024, 512, 512, 512) == 2


def test_kernel_flops_follow_the_busiest_sequence_shard():
  """Causal work is uneven over sequence shards: the last shard's queries see every key,
  so two shards cost more per device than half of one device's work."""
  c = _config()
  c.model.overrides.update(dict(layer_windows=[2048] * 4, global_window=2048, max_seq_len=2048))
  cfg = planning.model_config(c)
  one = cost_model.kernel_flops_per_device(cfg, 2048, 8, {"fsdp": 4}, rerun_forward=True)
  two = cost_model.kernel_flops_per_device(
    cfg, 2048, 8, {"fsdp": 2, "sequence": 2}, rerun_forward=True
  )
  # 512-tiles: the last shard computes 7 over 2 devices' rows; unsplit, 10 over 4.
  assert two / one == pytest.approx((7 / 2) / (10 / 4))
  # Full remat reruns the forward kernel: 11 matmuls per tile pair instead of 9.
  assert one / cost_model.kernel_flops_per_device(
    cfg, 2048, 8, {"fsdp": 4}, rerun_forward=False
  ) == (pytest.approx(11 / 9))
  # The fused backward kernel: 5 matmuls per tile pair instead of 7 (+ 2 or 4 forward).
  fused = cost_model.kernel_flops_per_device(
    cfg, 2048, 8, {"fsdp": 4}, rerun_forward=True, fused_backward=True
  )
  assert fused / one == pytest.approx(9 / 11)
  # Zigzag: 4 chunks of 512 rows; shard 0 runs chunks 0 and 3 (1 + 4 tiles), shard 1
  # chunks 1 and 2 (2 + 3): 5 tiles on either shard instead of 7 on the last.
  zig = cost_model.kernel_flops_per_device(
    cfg, 2048, 8, {"fsdp": 2, "sequence": 2}, rerun_forward=True, context_parallel="zigzag"
  )
  assert zig / two == pytest.approx(5 / 7)
  with pytest.raises(ConfigError, match="twice for zigzag"):
    cost_model.kernel_flops_per_device(
      cfg, 2048 + 2, 8, {"sequence": 2}, rerun_forward=True, context_parallel="zigzag"
    )
  with pytest.raises(ConfigError, match="sequence axis"):
    cost_model.kernel_flops_per_device(cfg, 2048, 8, {"sequence": 3}, rerun_forward=True)


def _lowered_step(c, compile_it: bool = False) -> str:
  """The StableHLO of the config's train step lowered for the TPU mesh (and compiled by
  libtpu too if asked)."""
  mesh = _mesh(c)
  program = planning.lm_step(c, planning.model_config(c), mesh).step
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    lowered = program.jitted.lower(*program.args)
    if compile_it:
      lowered.compile()
    return lowered.as_text()


def _kernel_calls(stablehlo: str, kernel: str) -> int:
  """Pallas kernels named `kernel*` that `main` runs, following the calls (the lowering
  outlines a function once and calls it from every layer that uses it)."""
  bodies = dict(re.findall(r"func\.func \w+ @(\w+)\((.*?)\n  }", stablehlo, re.S))

  @functools.cache
  def runs(name):
    body = bodies[name]
    direct = len(re.findall(f'kernel_name = "{kernel}', body))
    return direct + sum(runs(c) for c in re.findall(r"(?<!_)call @(\w+)\(", body))

  return runs("main")


@pytest.mark.parametrize("policy", ["full", "attention", "dots", "dots_no_batch", "none"])
def test_compiled_step_reruns_the_attention_forward_only_under_full_remat(policy):
  """The estimate's kernel count (`execution.reruns_attention_forward`) against the
  program: splash forward kernels in the lowered TPU step of 4 unrolled layers, one per
  layer, plus one per layer again where the backward rebuilds the kernels' residuals."""
  c = _config()
  c.execution.remat_policy = policy
  c.execution.scan_layers = False
  text = _lowered_step(c)
  assert _kernel_calls(text, "splash_mha_dq") == 4
  forward = _kernel_calls(text, "splash_mha_fwd")
  assert forward == 4 * (2 if execution.reruns_attention_forward(policy) else 1)


def test_unrolled_full_remat_compiles_the_recomputed_forward():
  """Full remat reruns each layer's q, k, v, gate and up projections in the backward
  (the matmuls whose outputs the backward reads; o and down feed only linear adds). In
  unrolled layers XLA would merge that rerun with the forward unless the remat is a CSE
  barrier, leaving the estimate (and the memory) without it."""
  flops = {}
  for policy in ("full", "dots"):
    c = _config()
    c.execution.update(dict(remat_policy=policy, scan_layers=False))
    with jax.default_matmul_precision("default"):
      flops[policy] = cost_model.compile_cost(c, _mesh(c), planning.lm_step)["flops"]
  cfg = planning.model_config(c)
  rerun_params = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 2 * cfg.dim * (
    cfg.ffn_dim
  )
  tokens_per_device = c.batch_size * c.seq_len / 4
  assert flops["full"] - flops["dots"] >= 2 * rerun_params * cfg.n_layers * tokens_per_device


def test_zigzag_step_compiles_for_tpu_with_its_kernels_per_half():
  """The zigzag layout on a sequence axis of 2 compiled by libtpu: each shard's lax.switch
  branch runs one splash kernel per half of its rows (2 shards x 2 halves per layer)."""
  c = _config()
  c.execution.update(dict(context_parallel="zigzag", scan_layers=False, remat_policy="attention"))
  c.mesh.update(fsdp=2, sequence=2)
  text = _lowered_step(c, compile_it=True)
  assert _kernel_calls(text, "splash_mha_fwd") == 4 * 2 * 2
  assert "collective_permute" in text or "ppermute" in text


def test_fused_backward_compiles_for_tpu_as_one_kernel():
  """`splash_fused_backward`: the lowered TPU step has no dq kernel, one dkv kernel per
  layer (which the cost model counts at 5 matmuls per tile pair)."""
  c = _config()
  c.execution.update(dict(splash_fused_backward=True, scan_layers=False))
  text = _lowered_step(c, compile_it=True)
  assert _kernel_calls(text, "splash_mha_dq") == 0
  assert _kernel_calls(text, "splash_mha_dkv") == 4


def test_extrapolated_estimate_matches_a_full_unrolled_compile(small):
  """Layers 1 and 2 extrapolated to 4 against all 4 compiled unrolled.

  FLOPs are additive per layer (1%). The seconds are a schedule, not a sum: the
  compiler overlaps a layer's FSDP all-gathers with its neighbours' compute, so a
  shallow program's per-layer delta differs a little from a deep one's: ~5% over
  the step at these widths (5.4% low at dim 256, 3.9% high at dim 512 with 2 and 4
  layers to 8), where collectives and memory passes weigh most; 8% bounds it, and
  the gap shrinks as matmuls dominate at larger width."""
  c, mesh, est = small
  with jax.default_matmul_precision("default"):
    direct = cost_model.estimate(c, mesh, planning.lm_step, 459.0, 1.0, "splash", layers=4)
  assert "4 layers (full depth)" in direct["estimate_method"]
  assert "1 and 2 layers" in est["estimate_method"]
  assert est["estimated_xla_flops_per_device"] == pytest.approx(
    direct["estimated_xla_flops_per_device"], rel=0.01
  )
  assert est["estimated_step_seconds"] == pytest.approx(direct["estimated_step_seconds"], rel=0.08)


def test_small_sharded_step_keeps_its_estimated_mfu_floor(small):
  _, _, est = small
  with open(FLOOR_FILE) as f:
    floor = json.load(f)
  assert floor["topology"] == TOPOLOGY
  kinds = est["estimated_seconds_by_kind"]
  assert kinds["attention_kernels"] > 0 and kinds["matmul"] > 0
  assert sum(kinds.values()) == pytest.approx(est["estimated_step_seconds"])
  assert est["estimated_mfu"] >= floor["floor"], (
    f"estimated MFU {est['estimated_mfu']:.4f} fell below the floor {floor['floor']} "
    f"({FLOOR_FILE}); breakdown {kinds}"
  )


def test_a_cost_model_that_does_not_grow_with_depth_gives_no_estimate(monkeypatch):
  """Extrapolating a shrinking time would print a negative step; it is reported instead."""
  seconds = iter([2e-3, 1e-3])
  monkeypatch.setattr(
    cost_model, "compile_cost", lambda *a: {"optimal_seconds": next(seconds), "flops": 1.0}
  )
  c = _config()
  est = cost_model.estimate(c, None, planning.lm_step, 459.0, 1.0, "splash", layers=1)
  assert "estimated_mfu" not in est and "does not grow" in est["estimate_error"]
  assert est["estimate_points"] == {1: 2e-3, 2: 1e-3}


def test_a_cost_model_that_does_not_grow_falls_back_to_the_roofline(monkeypatch):
  """Where the chip's HBM bandwidth is known, the same compiles' FLOPs and bytes give
  max(flops / peak, bytes / bandwidth) per depth, extrapolated as the cost model's
  seconds would be, and the method says so."""
  costs = iter(
    [
      {"optimal_seconds": -12.0, "flops": 459e12, "bytes accessed": 1e12},
      {"optimal_seconds": -17.0, "flops": 2 * 459e12, "bytes accessed": 4e12},
    ]
  )
  monkeypatch.setattr(cost_model, "compile_cost", lambda *a: next(costs))
  monkeypatch.setattr(cost_model, "hbm_bytes_per_second", lambda mesh: 1e12)
  c = _config()
  mesh = types.SimpleNamespace(shape={"fsdp": 1}, size=1)
  est = cost_model.estimate(c, mesh, planning.lm_step, 459.0, 459e12, "chunked", layers=1)
  # 1 layer: 1 s (compute-bound); 2 layers: 4 s (bytes-bound); 4 layers: 1 + 3 * 3 = 10 s.
  assert est["estimated_step_seconds"] == pytest.approx(10.0)
  assert est["estimate_points"] == {1: -12.0, 2: -17.0}
  assert "roofline" in est["estimate_method"]
  assert est["estimated_seconds_by_kind"]["matmul"] == pytest.approx(4.0)


def test_bad_accumulation_is_a_config_error(small):
  c, mesh, _ = small
  c = c.copy_and_resolve_references()
  c.grad_accum = 3
  with pytest.raises(ConfigError, match="multiple of grad_accum"):
    cost_model.estimate(c, mesh, planning.lm_step, 459.0, 1.0, "splash")


if __name__ == "__main__":
  cfg = _config()
  print(json.dumps(_estimate(cfg, _mesh(cfg)), indent=1))
