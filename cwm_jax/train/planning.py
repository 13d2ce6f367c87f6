"""Ahead-of-time plans of a training config: compile the real step, read its memory.

The stage's real step (the train step of `cwm_jax.train.lm.step_parts`, or a
caller's step builder such as the RL update step) is lowered for
ShapeDtypeStruct inputs carrying NamedShardings and compiled, so nothing is
allocated; so are the further programs a builder names (the RL sampler's
prefill, decode and extend steps), each reported with the arrays that stay resident on
the devices while it runs, and the stage fits when the largest of them does.
Two targets:

* host: N simulated CPU devices (`ensure_host_devices`); the CPU compiler's
  memory is an estimate for an accelerator.
* TPU: the compile-only devices of a Cloud TPU slice (`topology`, libtpu), so
  the real TPU compiler runs, Pallas kernels included, and `memory_analysis()`
  gives the per-device HBM figures a TPU would use.

Memory is reported in GiB per device; FLOPs per step come from
`cwm_jax.train.flops` (the compiler counts a scan body once); step time is
FLOPs over the devices' bf16 peak at 100% and 50% MFU, and, for TPU plans, the
TPU compiler's own estimate (`cost_model`: estimated step seconds and MFU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax._src import xla_bridge  # whether a backend exists yet (no public API says so)
from jax.sharding import Mesh

from cwm_jax import kernels
from cwm_jax.base import ConfigError
from cwm_jax.model import abstract_model
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import transfer
from cwm_jax.train import cost_model, flops, topology
from cwm_jax.train import state as state_lib
from cwm_jax.train import step as step_lib
from cwm_jax.train.config import execution_config, model_config, validate
from cwm_jax.train.lm import step_parts

GIB = 2**30
# libtpu refuses to compile a program whose temporaries exceed the chip's HBM; sizes in
# tsl's binary units (G = GiB).
_HBM_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED: .*HLO temporaries \(([\d.]+)([KMGT])\)")
_REEXEC = "CWM_PLAN_REEXEC"
# Cheaper host code generation; buffer assignment (the memory figures) is unchanged.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


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
      raise ConfigError(
        f"--mesh entry {part!r} must be AXIS=SIZE with AXIS in {mesh_lib.MESH_AXES}"
      )
    try:
      out[name.strip()] = int(size)
    except ValueError as e:
      raise ConfigError(f"--mesh entry {part!r}: size must be an integer") from e
  return out


def devices_needed(configs: list[tuple[str, Any]], mesh_text: str | None) -> int:
  """Device count implied by the (overridden) meshes; every planned stage must agree."""
  counts = set()
  for name, c in configs:
    sizes = {**dict(c.mesh), **parse_mesh(mesh_text)}
    if any(int(s) == -1 for s in sizes.values()):
      raise ConfigError(f"{name}: mesh {sizes} has a -1 axis; give --devices N")
    counts.add(math.prod(int(s) for s in sizes.values()))
  if len(counts) != 1:
    raise ConfigError(f"stages need different device counts {sorted(counts)}; give --devices N")
  return counts.pop()


def ensure_host_devices(n: int, argv: list[str]) -> None:
  """Makes JAX see n CPU devices: set XLA_FLAGS if no backend exists yet, else
  re-run `python -m cwm_jax.plan argv` in a fresh interpreter and exit with its code."""
  kept = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if "device_count" not in f and f.split("=")[0] not in {x.split("=")[0] for x in _FAST_COMPILE}
  ]
  flags_ = " ".join(kept + [f"--xla_force_host_platform_device_count={n}", *_FAST_COMPILE])
  if not xla_bridge.backends_are_initialized():
    os.environ["XLA_FLAGS"] = flags_
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    return
  if jax.device_count() < n and not os.environ.get(_REEXEC):
    env = {**os.environ, "XLA_FLAGS": flags_, "JAX_PLATFORMS": "cpu", _REEXEC: "1"}
    sys.exit(subprocess.call([sys.executable, "-m", "cwm_jax.plan", *argv[1:]], env=env))


def slice_mesh(sizes: dict, devices, num_slices: int = 1) -> Mesh:
  """A mesh over TPU devices laid out on the torus; several slices split `data`
  (the only axis crossing the data-centre network)."""
  if num_slices > 1:  # the runtime's mesh over the same devices (mesh_lib.make_mesh)
    return mesh_lib.multislice_mesh(sizes, devices, num_slices)
  return mesh_lib.make_mesh(sizes, devices)


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted program, the abstract sharded arguments it is compiled for, the abstract
  sharded arrays that stay on the devices while it runs without being its arguments
  (`resident`), and JSON-able facts about it for the plan (`info`)."""

  jitted: Any
  args: tuple
  resident: Any = ()
  info: dict = dataclasses.field(default_factory=dict)
  mesh: Mesh | None = None  # the mesh it runs on, when not the stage's (rollout replicas)


@dataclasses.dataclass(frozen=True)
class Steps:
  """What a step builder gives the planner: the stage's step, whose `args` are
  (sharded abstract train state, abstract batch), and further programs the stage
  runs, in named groups ({'sampler': {'prefill': Program, 'decode': Program}})."""

  step: Program
  extra: dict[str, dict[str, Program]] = dataclasses.field(default_factory=dict)
  # JSON-able facts: a group's under its name (beside its programs), the stage's under ''.
  info: dict[str, dict] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a stage runs beyond its mesh: the slice's process (host) count and devices, and
  the rollout replicas' mesh when the stage's rollouts have devices of their own."""

  processes: int = 1
  devices: int = 0
  rollout_mesh: Mesh | None = None


# (training config, ModelConfig, mesh, Target) -> Steps
StepBuilder = Callable[[Any, Any, Mesh, Target], Steps]


def lm_step(config, cfg, mesh, target: Target | None = None) -> Steps:
  """The jitted train step of an LM training config on `mesh`, with its abstract arguments."""
  _, abstract, shardings, batch_sh, jitted = step_parts(config, cfg, mesh)
  shape = (config.batch_size, config.seq_len)
  batch = {
    k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sh)
    for k in step_lib.BATCH_KEYS
  }
  return Steps(Program(jitted, (state_lib.with_shardings(abstract, shardings), batch)))


def analytic_plan(cfg, seq_len: int | None = None) -> dict[str, Any]:
  """The JSON-able plan of a ModelConfig at `seq_len` (default: cfg.max_seq_len),
  from `jax.eval_shape` of the model and an AdamW state: nothing is allocated."""
  seq_len = seq_len or cfg.max_seq_len
  params = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  opt_state = jax.eval_shape(optax.adamw(1e-4, mu_dtype="float32").init, params)
  fpt = flops.flops_per_token(cfg, seq_len)
  return {
    "params": flops.tree_size(params),
    "params_formula": cfg.param_count(),
    "matmul_params": flops.matmul_params(cfg),
    "layers": list(cfg.layer_windows),
    "effective_windows": list(cfg.effective_windows(seq_len)),
    "global_layers": list(cfg.global_layers),
    "seq_len": seq_len,
    "flops_per_token": fpt,
    "attention_flops_per_token": flops.attention_flops_per_token(cfg, seq_len),
    "flops_per_sequence": fpt * seq_len,
    "flops_formula": flops.FORMULA,
    "param_bytes": flops.tree_bytes(params),
    "optimizer_state_bytes": flops.tree_bytes(opt_state),
    "gradient_bytes": flops.tree_bytes(params),
  }


def _cost(compiled) -> dict:
  cost = (compiled.cost_analysis() if compiled is not None else None) or {}
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings
  (unpadded: a TPU may tile small minor dims up)."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def _memory(
  args: float, temp: float, resident: float, output: float = 0.0, alias: float = 0.0
) -> dict:
  total = args + output - alias + temp
  return {
    "argument_gb_per_device": args / GIB,
    "output_gb_per_device": output / GIB,
    "alias_gb_per_device": alias / GIB,
    "temp_gb_per_device": temp / GIB,
    "total_gb_per_device": total / GIB,
    "resident_gb_per_device": resident / GIB,
    "total_with_resident_gb_per_device": (total + resident) / GIB,
  }


def _compile(program: Program, mesh: Mesh) -> tuple[Any, dict]:
  """(compiled program, its per-device memory in GiB and compile time). A program the
  TPU compiler refuses for lack of HBM gives None and a lower bound: the compiler's
  temporaries plus the arguments from their shardings (outputs unknown), and the error."""
  t0 = time.perf_counter()
  resident = device_bytes(program.resident)
  try:
    with jax.set_mesh(program.mesh or mesh):
      compiled = program.jitted.lower(*program.args).compile()
  except jax.errors.JaxRuntimeError as e:
    found = _HBM_EXHAUSTED.search(str(e))
    if not found:
      raise
    temp = float(found[1]) * 1024 ** ("KMGT".index(found[2]) + 1)
    return None, {
      **_memory(device_bytes(program.args), temp, resident),
      "compile_error": str(e).splitlines()[0],
      "compile_seconds": round(time.perf_counter() - t0, 2),
    }
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return compiled, {
    **_memory(
      mem.argument_size_in_bytes,
      mem.temp_size_in_bytes,
      resident,
      mem.output_size_in_bytes,
      mem.alias_size_in_bytes,
    ),
    "compile_seconds": round(seconds, 2),
  }


def plan_one(
  config,
  mesh: Mesh,
  peak_tflops_per_device: float,
  step_builders: dict[str, StepBuilder] | None = None,
  estimate: bool = False,
  target: Target = Target(),
) -> dict:
  """Compiles one training config's programs on `mesh` and measures them: the builder
  of the stage's trainer from `step_builders` ({'rl': ...}), else the LM train step.

  The step's figures are top-level fields; a builder's further programs are under their
  group's key ({'sampler': {'prefill': {...}, 'decode': {...}}}); `peak_gb_per_device`
  is the largest total with resident arrays over all of them (`peak_program`).
  `estimate` adds the TPU cost model's step time and MFU (`cost_model.estimate`: two
  more compiles of the step, unrolled) when the step compiled.
  """
  trainer = config.get("stage", {}).get("trainer", "lm")
  cfg = model_config(config)
  run = execution_config(config)
  sizes = validate(config, cfg, mesh.size, target.processes)
  build = (step_builders or {}).get(trainer, lm_step)
  steps = build(config, cfg, mesh, target)
  compiled, mem = _compile(steps.step, mesh)
  state = steps.step.args[0]
  tokens = config.batch_size * config.seq_len
  step_flops = flops.flops_per_token(cfg, config.seq_len) * tokens
  t100 = step_flops / (mesh.size * peak_tflops_per_device * 1e12)
  stage_steps = config.total_steps - config.get("stage", {}).get("first_step", 0)  # its budget
  step_name = "rl_update" if trainer == "rl" else "train"
  plan = {
    "device_kind": mesh.devices.flat[0].device_kind,
    "devices": mesh.size,
    "processes": target.processes,
    "mesh": sizes,
    "step": step_name,
    "seq_len": config.seq_len,
    "batch_size": config.batch_size,
    "grad_accum": config.grad_accum,
    "tokens_per_step": tokens,
    "total_steps": config.total_steps,
    "layers": list(cfg.layer_windows),
    "rope_scaling": cfg.rope_scaling is not None,
    "remat": run.remat_policy,
    "attention_impl": kernels.resolve(run.attention_impl, mesh.devices.flat[0].platform),
    "context_parallel": run.context_parallel,
    "params": flops.tree_size(state["params"]),
    "state_bytes_total": flops.tree_bytes(state),
    **{k: v for k, v in mem.items() if k != "compile_seconds"},
    "memory_unit": "GiB (2**30 bytes)",
    "flops_per_step": step_flops,
    "flops_method": "analytic: (6*matmul_params + per-layer attention at its window) * tokens",
    "xla_flops_scan_bodies_once": float(_cost(compiled).get("flops", 0.0)),
    "peak_tflops_per_device": peak_tflops_per_device,
    "step_seconds_at_100pct_mfu": t100,
    "step_seconds_at_50pct_mfu": 2 * t100,
    "stage_steps": stage_steps,
    "days_at_50pct_mfu": stage_steps * 2 * t100 / 86400,
    "compile_seconds": mem["compile_seconds"],
  }
  if estimate and compiled is not None:
    t0 = time.perf_counter()
    plan.update(
      cost_model.estimate(
        config, mesh, build, peak_tflops_per_device, step_flops, plan["attention_impl"]
      )
    )
    if "estimated_step_seconds" in plan:
      plan["days_at_estimated_mfu"] = stage_steps * plan["estimated_step_seconds"] / 86400
    plan["estimate_compile_seconds"] = round(time.perf_counter() - t0, 2)
  peaks = {step_name: mem["total_with_resident_gb_per_device"]}
  for group, programs in steps.extra.items():
    plan[group] = dict(steps.info.get(group, {}))
    for name, program in programs.items():
      plan[group][name] = {**program.info, **_compile(program, mesh)[1]}
      peaks[f"{group}.{name}"] = plan[group][name]["total_with_resident_gb_per_device"]
  plan.update(steps.info.get("", {}))
  plan["peak_program"] = max(peaks, key=peaks.get)
  plan["peak_gb_per_device"] = peaks[plan["peak_program"]]
  return plan


def _figures(name: str, p: dict) -> str:
  """The numbers behind a stage's peak, for the NotFitting message."""
  where = f"on mesh {p['mesh']}"
  group, _, program = p["peak_program"].partition(".")
  q = p[group][program] if program else p  # the step's figures are top-level
  if "compile_error" in q:
    where += " (the compiler ran out of HBM: temporaries from its error, arguments unpadded)"
  if q is p:
    resident = (
      f" + resident {p['resident_gb_per_device']:.2f}" if p["resident_gb_per_device"] else ""
    )
    return (
      f"{name}: {p['peak_gb_per_device']:.2f} GiB per device (arguments "
      f"{p['argument_gb_per_device']:.2f} + temporaries {p['temp_gb_per_device']:.2f}"
      f"{resident}) {where}"
    )
  return (
    f"{name}: {p['peak_program']} {p['peak_gb_per_device']:.2f} GiB per device (arguments "
    f"{q['argument_gb_per_device']:.2f} + temporaries {q['temp_gb_per_device']:.2f} + "
    f"resident {q['resident_gb_per_device']:.2f}) {where}, where the {p['step']} step "
    f"alone needs {p['total_with_resident_gb_per_device']:.2f}"
  )


def split_meshes(config, devices, make_mesh) -> tuple[Mesh, Target]:
  """The stage's mesh over `devices` (`make_mesh(config, devices)`) and its Target: with
  `rl.rollout_devices`, the trainer's share of every host's devices and the rollout
  replicas' mesh over the rest (`parallel.transfer`)."""
  processes = len({getattr(d, "process_index", 0) for d in devices})
  rollout = config.get("rl", {}).get("rollout_devices", 0)
  if not rollout or config.get("stage", {}).get("trainer", "lm") != "rl":
    return make_mesh(config, devices), Target(processes, len(devices))
  errors = transfer.split_errors(
    len(devices), processes, rollout, config.rl.rollout_tensor, config.batch_size
  )
  if errors:
    raise ConfigError("invalid RL config: " + "; ".join(errors))
  trainer, by_process = transfer.split_devices(rollout, devices)
  lay = transfer.layout(trainer, by_process, config.rl.rollout_tensor)
  return make_mesh(config, trainer), Target(processes, len(devices), lay.mesh)


def _plan_stages(
  configs,
  devices,
  make_mesh,
  peak: float,
  hbm_gb: float | None,
  mesh_text: str | None,
  step_builders: dict[str, StepBuilder] | None,
  where: str,
  extra: dict | None = None,
  estimate: bool = False,
) -> dict:
  plans = {}
  for name, c in configs:
    c = c.copy_and_resolve_references()
    c.mesh.update(parse_mesh(mesh_text))
    try:
      mesh, target = split_meshes(c, devices, make_mesh)
      plans[name] = plan_one(c, mesh, peak, step_builders, estimate, target)
    except ConfigError as e:
      raise ConfigError(f"{name}: {e}") from e
    plans[name].update(extra or {})
    if hbm_gb is not None:
      plans[name]["hbm_gb"] = hbm_gb
      plans[name]["fits"] = plans[name]["peak_gb_per_device"] <= hbm_gb
  result = plans["train"] if list(plans) == ["train"] else {"stages": plans}
  over = {n: p for n, p in plans.items() if not p.get("fits", True)}
  if over:
    figures = "; ".join(_figures(n, p) for n, p in over.items())
    advice = "raise fsdp/tensor/sequence or grad_accum, or use remat"
    if any(p["peak_program"] != p["step"] for p in over.values()):
      advice = (
        "fewer rows per device (a smaller batch_size or more data x fsdp devices), "
        "fewer kv heads per device (tensor) or a shorter seq_len"
      )
    raise NotFitting(
      f"does not fit {hbm_gb} GiB per device of {where}: {figures}; {advice}", result
    )
  return result


def host_plan(
  configs: list[tuple[str, Any]],
  n_devices: int,
  mesh_text: str | None = None,
  hbm_gb: float | None = None,
  peak_tflops: float = 989.0,
  step_builders: dict[str, StepBuilder] | None = None,
) -> dict:
  """Plans each (name, training config) on `n_devices` host devices; NotFitting above
  `hbm_gb`. One config named 'train' gives its plan, several {'stages': {name: plan}}."""
  if jax.device_count() < n_devices:
    raise ConfigError(
      f"{n_devices} devices requested but JAX sees {jax.device_count()}; "
      "run through `python -m cwm_jax.plan`, which sets XLA_FLAGS"
    )
  devs = jax.devices()[:n_devices]
  return _plan_stages(
    configs,
    devs,
    lambda c, d: mesh_lib.make_mesh(dict(c.mesh), d),
    peak_tflops,
    hbm_gb,
    mesh_text,
    step_builders,
    f"{n_devices} host devices",
  )


def tpu_plan(
  configs: list[tuple[str, Any]],
  slice_name: str,
  num_slices: int = 1,
  mesh_text: str | None = None,
  hbm_gb: float | None = None,
  step_builders: dict[str, StepBuilder] | None = None,
  estimate: bool = True,
) -> dict:
  """Plans each (name, training config) for a TPU slice (type or topology) with libtpu.

  With `estimate`, each compiled step also gets the TPU cost model's estimated step
  seconds and MFU (`cost_model.estimate`), the compiler's own timing of its program.

  Fits when the largest compiled program's total per device, with its resident
  arrays, is within the chip's HBM (or `hbm_gb`); otherwise NotFitting naming the
  stage, the program and the figures.
  """
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} must be >= 1")
  spec = topology.slice_spec(slice_name)
  devs = topology.devices(spec, num_slices)
  per_chip = topology.devices_per_chip(devs)
  limit = hbm_gb if hbm_gb is not None else spec.chip.hbm_gib / per_chip
  extra = dict(
    topology=spec.topology,
    num_slices=num_slices,
    chips=spec.chips * num_slices,
    devices_per_chip=per_chip,
    chip_hbm_gib=spec.chip.hbm_gib,
    peak_tflops_per_chip=spec.chip.peak_tflops,
  )
  return _plan_stages(
    configs,
    devs,
    lambda c, d: slice_mesh(dict(c.mesh), d, num_slices),
    spec.chip.peak_tflops / per_chip,
    limit,
    mesh_text,
    step_builders,
    f"{num_slices} x {spec.topology}",
    extra,
    estimate,
  )
