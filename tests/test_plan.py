"""The planner: exact 32B count, FLOPs against brute force, AOT memory and the fit check."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from test_launch import ROOT

from cwm_jax.base import ConfigError
from cwm_jax.kernels.masks import allowed
from cwm_jax.model import abstract_model
from cwm_jax.model.config import cwm_32b, meta_layer_windows, preset, tiny
from cwm_jax.train import flops, planning

GIB = 2**30


def test_cwm_32b_analytic_plan():
  plan = planning.analytic_plan(cwm_32b(), seq_len=8192)
  assert plan["params"] == 32_581_097_472
  assert plan["layers"] == list(meta_layer_windows(64, 8192, 131072))
  assert len(plan["global_layers"]) == 17
  assert plan["param_bytes"] == 4 * 32_581_097_472  # float32 params
  assert plan["optimizer_state_bytes"] >= 2 * plan["param_bytes"]  # AdamW mu + nu in float32


def test_cwm_8b_has_llama_3_8b_widths():
  """The 8B-class preset takes Llama-3-8B's widths (untied head): Meta's published
  parameter count, 8,030,261,248; CWM's window pattern, one global layer in four."""
  cfg = preset("cwm_8b")
  assert cfg.param_count() == 8_030_261_248
  assert list(cfg.layer_windows) == list(meta_layer_windows(32, 8192, 131072))


def test_flops_per_token_matches_brute_force_counts():
  cfg = tiny(n_layers=5, local_window=4)
  t = 11
  q = np.arange(t)
  keys = {
    w: int(np.asarray(allowed(q[:, None], q[None, :], np.ones(t), np.ones(t), w)).sum())
    for w in set(cfg.layer_windows)
  }
  attention = sum(12 * cfg.n_heads * cfg.head_dim * keys[w] / t for w in cfg.layer_windows)
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  matmul = sum(
    int(np.prod(x.shape))
    for path, x in _flat(shapes)  # no gather, no norms
    if "embed/" not in path and "norm" not in path
  )
  np.testing.assert_allclose(flops.flops_per_token(cfg, t), 6 * matmul + attention, rtol=1e-12)
  # The per-batch count of packed documents agrees on one full document.
  pos, seg = q[None, :], np.ones((1, t), np.int32)
  np.testing.assert_allclose(
    flops.batch_flops(cfg, pos, seg) / t, flops.flops_per_token(cfg, t), rtol=1e-12
  )
  for w in set(cfg.layer_windows):
    assert flops.causal_pairs(t, w) == keys[w]


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield prefix + k, v


def _plan(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run(
    [sys.executable, "-m", "cwm_jax.plan", *args], cwd=ROOT, env=env, capture_output=True, text=True
  )


def test_preset_cli_prints_exact_count():
  out = _plan("--preset", "cwm_32b")
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["params"] == 32_581_097_472


def test_cwm_32b_pretrain_on_64_devices_reports_memory_and_exits_2_when_too_small():
  # One compile serves both checks: the plan JSON is printed before the fit check fails.
  out = _plan(
    "--config",
    "configs/cwm_32b.py:stage=pretrain",
    "--devices",
    "64",
    "--mesh",
    "data=1,fsdp=64",
    "--config.grad_accum=32",
    "--hbm_gb",
    "2",
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "does not fit 2.0 GiB per device" in out.stderr and "pretrain:" in out.stderr
  plan = json.loads(out.stdout)["stages"]["pretrain"]
  assert plan["devices"] == 64 and plan["params"] == 32_581_097_472
  # Arguments are the sharded train state: params + AdamW mu, nu (float32): 12 B/param.
  assert abs(plan["argument_gb_per_device"] - 12 * 32_581_097_472 / 64 / GIB) < 0.1
  assert plan["total_gb_per_device"] > 2 and plan["temp_gb_per_device"] > 0
  assert plan["fits"] is False and plan["hbm_gb"] == 2
  assert (
    plan["flops_per_step"]
    == flops.flops_per_token(cwm_32b(layer_windows=(8192,) * 64, global_window=8192), 8192)
    * 2048
    * 8192
  )
  assert plan["step_seconds_at_50pct_mfu"] == 2 * plan["step_seconds_at_100pct_mfu"]


def test_smoke_stage_plan_fits():
  out = _plan("--config", "configs/smoke.py:stage=midtrain", "--devices", "4", "--hbm_gb", "1")
  assert out.returncode == 0, out.stderr[-2000:]
  plans = json.loads(out.stdout)["stages"]
  assert list(plans) == ["midtrain"] and plans["midtrain"]["total_gb_per_device"] < 1
  assert plans["midtrain"]["seq_len"] == 128 and plans["midtrain"]["rope_scaling"]
  assert plans["midtrain"]["mesh"]["data"] == 4


def rl_sampler_stage():
  """configs/smoke.py's RL stage on a model whose KV cache outweighs its update step: 16
  global layers of 8 kv heads x 128 on a narrow stream (dim 128, vocab 512), params and
  optimizer state over fsdp=4, so the 32 rollout rows are split 4 ways."""
  from cwm_jax.recipe import grids, stages  # pylint: disable=g-import-not-at-top

  ((name, c),) = stages.stage_configs(grids.parse_config("configs/smoke.py:stage=rl"))
  c.model.overrides.update(
    dict(
      vocab_size=512,
      n_layers=16,
      layer_windows=[128] * 16,
      dim=128,
      ffn_dim=128,
      n_heads=8,
      n_kv_heads=8,
      head_dim=128,
    )
  )
  c.execution.remat_policy = "full"
  c.mesh.update(data=1, fsdp=4)
  return [(name, c)]


def check_sampler_plan(plan_stages, hbm_gb=0.1):
  """Plans `rl_sampler_stage()` with `plan_stages(configs, hbm_gb)` (4 devices): the sampler's
  prefill, decode and extend take the cache split over the rows, and it is the sampler, not the
  update step, that does not fit `hbm_gb`."""
  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  configs = rl_sampler_stage()
  ((_, c),) = configs
  with pytest.raises(
    planning.NotFitting,
    match=r"rl: sampler\.(prefill|decode|extend) .* where the "
    r"rl_update step alone needs .*fewer rows per device",
  ) as e:
    plan_stages(configs, hbm_gb, {"rl": rl_step_builder})
  plan = e.value.plan["stages"]["rl"]
  cfg = planning.model_config(c)
  # float32 K and V of every layer's slots (min(window, seq_len)) for every row
  cache = (
    sum(min(w, c.seq_len) for w in cfg.layer_windows)
    * c.batch_size
    * cfg.n_kv_heads
    * cfg.head_dim
    * 2
    * 4
  )
  params = 4 * plan["params"] / 4  # float32, over fsdp=4
  assert plan["devices"] == 4 and plan["sampler"]["prefill"]["prompt_len"] == 80 - 24
  assert plan["sampler"]["extend"]["block_len"] == 56
  for name in ("prefill", "decode", "extend"):
    p = plan["sampler"][name]
    assert p["cache_len"] == 80 and p["rows"] == 32
    # arguments: the params, a quarter of the cache, the tokens and row starts (and on a TPU
    # the tiling of small arrays: < 64 KiB in all)
    assert 0 <= p["argument_gb_per_device"] * GIB - params - cache / 4 < 2**16, (p, cache)
    # resident: AdamW's float32 mu and nu, over fsdp like the params
    assert p["resident_gb_per_device"] * GIB == pytest.approx(2 * params, rel=1e-3)
    assert p["total_with_resident_gb_per_device"] == pytest.approx(
      p["total_gb_per_device"] + p["resident_gb_per_device"]
    )
  assert plan["total_gb_per_device"] < hbm_gb < plan["peak_gb_per_device"]
  assert plan["peak_program"].startswith("sampler.") and plan["fits"] is False
  return plan


def test_rl_stage_plans_the_sampler_steps_on_host_devices():
  check_sampler_plan(
    lambda configs, hbm_gb, builders: planning.host_plan(
      configs, 4, hbm_gb=hbm_gb, step_builders=builders
    )
  )


@pytest.mark.parametrize(
  "stage, devices, mesh, accum, seq_len",
  [
    ("midtrain", 64, "data=1,fsdp=8,tensor=1,sequence=8", 16, 131072),
    ("sft", 128, "data=1,fsdp=64,tensor=1,sequence=2", 4, 32768),
  ],
)
def test_cwm_32b_long_context_stages_compile(stage, devices, mesh, accum, seq_len):
  """Mid-training (131k, context parallel over `sequence`) and SFT plan in CI-sized form."""
  out = _plan(
    "--config",
    f"configs/cwm_32b.py:stage={stage}",
    "--devices",
    str(devices),
    "--mesh",
    mesh,
    f"--config.grad_accum={accum}",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  plan = json.loads(out.stdout)["stages"][stage]
  assert plan["seq_len"] == seq_len and plan["rope_scaling"] and plan["devices"] == devices
  assert plan["layers"].count(131072) == 17 and plan["layers"][-1] == 131072
  # The train state (params + AdamW mu, nu in float32) is sharded over fsdp x sequence.
  assert abs(plan["argument_gb_per_device"] - 12 * 32_581_097_472 / devices / GIB) < 0.1
  assert plan["attention_impl"] == "chunked"  # 'auto' on CPU devices
  assert plan["temp_gb_per_device"] > 0


def disaggregated_rl_stage(rollout_devices: int = 4, tensor: int = 2, trainer: int = 4):
  """configs/smoke.py's RL stage with rollouts on devices of their own: the trainer's
  `trainer` devices (fsdp) and `rollout_devices` in `tensor`-way replicas."""
  from cwm_jax.recipe import grids, stages  # pylint: disable=g-import-not-at-top

  ((name, c),) = stages.stage_configs(grids.parse_config("configs/smoke.py:stage=rl"))
  c.mesh.update(data=1, fsdp=trainer)
  c.rl.update(rollout_devices=rollout_devices, rollout_tensor=tensor, rollout_dtype="bfloat16")
  return [(name, c)]


def check_disaggregated_plan(plan: dict, processes: int, devices: int = 4) -> None:
  """The update step on the trainer's share, prefill / decode / extend on the replicas'
  mesh with its own memory, and the weight-sync bytes (bfloat16 params, each replica device
  its tensor shard)."""
  assert plan["step"] == "rl_update" and plan["devices"] == devices
  assert plan["processes"] == processes
  rollout = plan["rollout"]
  assert rollout["mesh"] == {"data": devices // 2, "fsdp": 1, "tensor": 2, "sequence": 1}
  assert rollout["devices"] == devices and rollout["replicas"] == devices // 2
  assert rollout["param_dtype"] == "bfloat16"
  for name in ("prefill", "decode", "extend"):
    p = rollout[name]
    assert p["rows"] == plan["batch_size"] and p["resident_gb_per_device"] == 0
    assert p["total_gb_per_device"] > 0
  # Every rollout device receives its tensor shard of every param in bfloat16: at least a
  # quarter (bf16 / 2 tensor ways ... of f32) and at most all of the params' bytes.
  per_device = plan["weight_sync_bytes_per_rollout_device"]
  assert plan["params"] * 2 / 2 <= per_device <= plan["params"] * 2
  assert plan["weight_sync_gb"] == pytest.approx(per_device * devices / 1e9)
  assert "sampler" not in plan


def test_disaggregated_rl_stage_plans_both_meshes_on_host_devices():
  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  plan = planning.host_plan(disaggregated_rl_stage(), 8, step_builders={"rl": rl_step_builder})
  check_disaggregated_plan(plan["stages"]["rl"], processes=1)


def test_continuous_batching_plans_the_rollout_programs_for_its_slots():
  """With `rl.rollout_slots` the replicas sample that many rows at once, so their programs
  (and KV cache) are compiled for the slots, not the whole batch."""
  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  ((name, c),) = disaggregated_rl_stage()
  whole = planning.host_plan([(name, c)], 8, step_builders={"rl": rl_step_builder})
  c.rl.rollout_slots = 2  # one row per replica
  slots = planning.host_plan([(name, c)], 8, step_builders={"rl": rl_step_builder})
  before, after = whole["stages"]["rl"]["rollout"], slots["stages"]["rl"]["rollout"]
  assert before["prefill"]["rows"] == c.batch_size > 2
  for program in ("prefill", "decode", "extend"):
    assert after[program]["rows"] == 2
    ratio = after[program]["cache_gb_per_device"] / before[program]["cache_gb_per_device"]
    assert ratio == pytest.approx(2 / c.batch_size)


def test_disaggregated_rl_stage_that_cannot_split_exits_before_compiling():
  from cwm_jax.rl.step_builder import rl_step_builder  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match="multiple of the 4 trainer devices"):
    planning.host_plan(
      disaggregated_rl_stage(rollout_devices=2), 6, step_builders={"rl": rl_step_builder}
    )
