"""Ahead-of-time plan of a training config on N (simulated) devices.

The real train step (`cwm_jax.train.step`, the optimizer and state shardings
the loop uses) is lowered and compiled for ShapeDtypeStruct inputs carrying
NamedShardings, so nothing is allocated. Reported per device: argument,
output, temporary and total bytes from XLA's memory analysis. FLOPs per step
are counted analytically (`cwm_jax.planner.flops_per_token` times the tokens
of a step), because XLA's cost analysis counts a scan body (the layer stack,
gradient accumulation, loss chunks, attention chunks) once; its raw figure is
reported as `xla_flops_scan_bodies_once` for reference. Memory figures come
from the host (CPU) compiler, which fuses and schedules differently from GPU
and TPU backends: treat them as an estimate.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from cwm_jax import planner
from cwm_jax.model.config import ConfigError
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.train import state as state_lib, step as step_lib
from cwm_jax.train.loop import step_parts
from cwm_jax.train.config import model_config, validate

GB = 1e9


class NotFitting(ConfigError):
  """The compiled step needs more memory per device than allowed; `.plan` has the numbers."""

  def __init__(self, message: str, plan: dict):
    super().__init__(message)
    self.plan = plan


def parse_mesh(text: str | None) -> dict[str, int]:
  """'data=8,fsdp=8' -> {'data': 8, 'fsdp': 8}."""
  out = {}
  for part in filter(None, (text or "").split(",")):
    name, sep, size = part.partition("=")
    if not sep or name.strip() not in mesh_lib.MESH_AXES:
      raise ConfigError(f"--mesh entry {part!r} must be AXIS=SIZE with AXIS in {mesh_lib.MESH_AXES}")
    try:
      out[name.strip()] = int(size)
    except ValueError as e:
      raise ConfigError(f"--mesh entry {part!r}: size must be an integer") from e
  return out


def train_configs(config) -> list[tuple[str, Any]]:
  """[(name, plain training config)]: the selected stages of a schedule, or the config."""
  if "schedule" not in config:
    return [("train", config)]
  from cwm_jax.train import stages  # pylint: disable=g-import-not-at-top
  all_stages = stages.stages_from_config(config)
  return [(st.name, stages.stage_config(config, all_stages.index(st), "/plan"))
          for st in stages.selected(config, all_stages)]


def devices_needed(config, mesh_text: str | None) -> int:
  """Device count implied by the (overridden) meshes; every planned stage must agree."""
  counts = set()
  for name, c in train_configs(config):
    sizes = {**dict(c.mesh), **parse_mesh(mesh_text)}
    if any(int(s) == -1 for s in sizes.values()):
      raise ConfigError(f"{name}: mesh {sizes} has a -1 axis; give --devices N")
    counts.add(math.prod(int(s) for s in sizes.values()))
  if len(counts) != 1:
    raise ConfigError(f"stages need different device counts {sorted(counts)}; give --devices N")
  return counts.pop()


def _compile(config, cfg, mesh):
  _, abstract, shardings, batch_sh, jitted = step_parts(config, cfg, mesh)
  shape = (config.batch_size, config.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32,
                                   sharding=batch_sh) for k in step_lib.BATCH_KEYS}
  with jax.set_mesh(mesh):
    return jitted.lower(state_lib.with_shardings(abstract, shardings), batch).compile(), abstract


def plan_one(config, n_devices: int, mesh_text: str | None, peak_tflops: float) -> dict:
  """Compiles one training config's step for `n_devices` and measures it."""
  config = config.copy_and_resolve_references()
  config.mesh.update(parse_mesh(mesh_text))
  cfg = model_config(config)
  sizes = validate(config, cfg, n_devices, 1)
  mesh = mesh_lib.make_mesh(sizes, jax.devices()[:n_devices])
  t0 = time.perf_counter()
  compiled, abstract = _compile(config, cfg, mesh)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  tokens = config.batch_size * config.seq_len
  flops = planner.flops_per_token(cfg, config.seq_len) * tokens
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  t100 = flops / (n_devices * peak_tflops * 1e12)
  return {
      "devices": n_devices, "mesh": sizes, "seq_len": config.seq_len,
      "batch_size": config.batch_size, "grad_accum": config.grad_accum,
      "tokens_per_step": tokens, "total_steps": config.total_steps,
      "layers": list(cfg.layer_windows), "rope_scaling": cfg.rope_scaling is not None,
      "remat": cfg.remat_policy,
      "params": planner.tree_size(abstract["params"]),
      "state_bytes_total": planner.tree_bytes(abstract),
      "argument_gb_per_device": mem.argument_size_in_bytes / GB,
      "output_gb_per_device": mem.output_size_in_bytes / GB,
      "alias_gb_per_device": mem.alias_size_in_bytes / GB,
      "temp_gb_per_device": mem.temp_size_in_bytes / GB,
      "total_gb_per_device": per_device / GB,
      "flops_per_step": flops,
      "flops_method": "analytic: (6*matmul_params + per-layer attention at its window) * tokens",
      "xla_flops_scan_bodies_once": float(cost.get("flops", 0.0)),
      "peak_tflops_per_device": peak_tflops,
      "step_seconds_at_100pct_mfu": t100, "step_seconds_at_50pct_mfu": 2 * t100,
      "compile_seconds": round(time.perf_counter() - t0, 2),
  }


def aot_plan(config, n_devices: int, mesh_text: str | None, hbm_gb: float | None,
             peak_tflops: float) -> dict:
  """Plans every selected stage; raises NotFitting if any exceeds `hbm_gb` per device."""
  if jax.device_count() < n_devices:
    raise ConfigError(f"{n_devices} devices requested but JAX sees {jax.device_count()}; "
                      "run through `python -m cwm_jax.plan`, which sets XLA_FLAGS")
  plans = {}
  for name, c in train_configs(config):
    try:
      plans[name] = plan_one(c, n_devices, mesh_text, peak_tflops)
    except ConfigError as e:
      raise ConfigError(f"{name}: {e}") from e
  result = plans["train"] if list(plans) == ["train"] else {"stages": plans}
  if hbm_gb is not None:
    result["hbm_gb"] = hbm_gb
    over = {n: round(p["total_gb_per_device"], 2) for n, p in plans.items()
            if p["total_gb_per_device"] > hbm_gb}
    if over:
      raise NotFitting(f"does not fit {hbm_gb} GB per device: needs {over} GB "
                       "(raise fsdp/tensor/sequence, grad_accum, or use remat)", result)
  return result
