"""Estimated TPU step time and MFU from the TPU compiler's own cost model.

A libtpu compile's `cost_analysis()` has `optimal_seconds` (the compiler's
estimate of the program's run time: compute, memory traffic, collectives) and
`flops` (per device), but it counts a scan or while body once, and it leaves
Pallas kernels (splash attention) out. So the estimate is built from pieces:

* XLA part, measured: the step compiled with its layers unrolled (scan off) at
  `p` and `2p` layers of the real window pattern, grad_accum 1 over one
  micro-batch, on the real mesh (the real per-device shardings), then
  extrapolated linearly in the layer count to full depth and multiplied by the
  accumulation steps. Under splash a layer's XLA cost does not depend on its
  window (the kernel is the only part that does), so a linear fit in layers is
  exact up to fusion at block boundaries; `tests/test_cost_model.py` checks it
  against a full unrolled compile. Multiplying by grad_accum also repeats the
  optimizer update (run once per step): an overestimate of a memory-bound pass
  over the per-device optimizer state, small against a step of many layers.
* Attention kernels, derived: splash's FLOPs from its block-sparse schedule
  (every (q-block, kv-block) tile the mask touches, as the kernel computes
  them), on the busiest sequence shard, forward + backward (separate dq and
  dkv kernels, each recomputing the scores; one kernel with
  `splash_fused_backward`) + the forward again under remat
  'full' (`execution.reruns_attention_forward`: every other policy keeps the
  kernel's named residuals; `tests/test_cost_model.py` counts the forward kernels
  in the compiled step), at `KERNEL_EFFICIENCY` of the chip's bf16 peak.

Where the cost model's time does not grow with depth (libtpu's for v6e scores the 32B
steps negative, whatever the depth pair), the same compiles' FLOPs and bytes give a
roofline time instead (`roofline_seconds`), named in `estimate_method`.

`estimated_seconds_by_kind`: `matmul` is the cost model's FLOPs (measured) at
peak; `attention_kernels` the derived kernel time; `other` the cost model's
seconds minus the matmul time (memory-bound fusions, collectives not hidden,
matmuls below peak, copies; cost_analysis has no finer split).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from cwm_jax.base import ConfigError
from cwm_jax.kernels import splash
from cwm_jax.model.execution import reruns_attention_forward
from cwm_jax.train import topology
from cwm_jax.train.config import execution_config, model_config

# Splash attention's share of the bf16 peak. No public per-kernel measurement is cited
# here, so the stated default stands: 50% of peak.
KERNEL_EFFICIENCY = 0.5
# Matmuls per (query, key) tile pair and head: forward QK^T, PV; backward dkv kernel QK^T,
# dV, dP, dK; dq kernel QK^T, dP, dQ (the fused backward kernel: QK^T, dV, dP, dK, dQ). A
# rematerialised forward adds QK^T, PV again.
FWD_MATMULS, BWD_MATMULS, FUSED_BWD_MATMULS = 2, 7, 5
# HBM bandwidth per chip in GB/s (Google Cloud TPU system architecture pages), by the
# device_kind words naming the generation, first match wins (v5p's kind is "TPU v5", v5e's
# "TPU v5 lite"); only the roofline fallback uses it.
HBM_GBPS = (
  (("v6 lite", "v6e"), 1640.0),
  (("v5 lite", "v5e"), 819.0),
  (("v5",), 2765.0),
  (("v4",), 1228.0),
)


def window_period(windows: tuple[int, ...]) -> int:
  """Smallest p with windows[i] == windows[i % p] for every layer but the last (Meta's
  pattern makes the last layer global whatever its place)."""
  body = windows[:-1] or windows
  for p in range(1, len(body) + 1):
    if all(w == body[i % p] for i, w in enumerate(body)):
      return p
  return len(body)


def tiles_touched(t: int, s: int, window: int, offset: int, bq: int, bkv: int) -> int:
  """(q-block, kv-block) tiles with any visible pair (q + offset - k in [0, window))
  for t queries at positions offset.. against s keys: the tiles splash computes."""
  total = 0
  for i in range(math.ceil(t / bq)):
    q0, q1 = offset + i * bq, offset + min(t, (i + 1) * bq) - 1
    k0, k1 = max(0, q0 - window + 1), min(s - 1, q1)
    if k1 >= k0:
      total += k1 // bkv - k0 // bkv + 1
  return total


def kernel_flops_per_device(
  cfg,
  seq_len: int,
  batch: int,
  mesh_sizes: dict,
  rerun_forward: bool,
  context_parallel: str = "allgather",
  fused_backward: bool = False,
) -> float:
  """Splash FLOPs per device for one micro-batch's forward + backward, every layer at its
  window, sized by the busiest sequence shard: with contiguous shards each shard's
  queries see all earlier keys, so causal work is uneven and the last shard sets the
  step; `context_parallel='zigzag'` gives shard r chunks r and 2n - 1 - r of 2n, each
  run at its own offset, which evens it out. `fused_backward`: splash's one-kernel
  backward (`execution.splash_fused_backward`)."""
  shards = int(mesh_sizes.get("sequence", 1))
  zigzag = context_parallel == "zigzag" and shards > 1
  parts = 2 * shards if zigzag else shards
  if seq_len % parts:
    raise ConfigError(
      f"seq_len={seq_len} is not a multiple of the sequence axis ({shards}"
      f"{', twice for zigzag' if zigzag else ''})"
    )
  t = seq_len // parts  # rows per kernel call
  pad = splash.MIN_BLOCK  # the kernel runs on lengths padded to its smallest tile
  bq = splash.fit_block(-(-t // pad) * pad, splash.MAX_BLOCK, pad)
  bkv = splash.fit_block(-(-seq_len // pad) * pad, splash.MAX_BLOCK, pad)
  bwd = FUSED_BWD_MATMULS if fused_backward else BWD_MATMULS
  matmuls = bwd + FWD_MATMULS * (2 if rerun_forward else 1)
  chunks = [(r, 2 * shards - 1 - r) if zigzag else (r,) for r in range(shards)]
  per_head_seq = 0.0
  for w in cfg.effective_windows(seq_len):
    busiest = max(sum(tiles_touched(t, seq_len, w, j * t, bq, bkv) for j in js) for js in chunks)
    per_head_seq += busiest * bq * bkv * 2 * cfg.head_dim * matmuls
  # Batch rows and heads split over the other axes; the sequence split is in `busiest`.
  others = math.prod(int(v) for k, v in mesh_sizes.items() if k != "sequence")
  return per_head_seq * batch * cfg.n_heads / others


def hbm_bytes_per_second(mesh) -> float | None:
  """HBM bandwidth per device of the mesh's TPU generation (None when unknown)."""
  if mesh is None:
    return None
  devs = list(mesh.devices.flat)
  if devs[0].platform != "tpu":
    return None
  kind = devs[0].device_kind.lower()
  for names, gbps in HBM_GBPS:
    if any(n in kind for n in names):
      return gbps * 1e9 / topology.devices_per_chip(devs)
  return None


def roofline_seconds(cost: dict, peak: float, bandwidth: float) -> float:
  """A compiled program's time if it ran at the chip's peak or its HBM bandwidth,
  whichever binds (collectives only as the bytes they move through HBM)."""
  return max(
    float(cost.get("flops", 0.0)) / peak, float(cost.get("bytes accessed", 0.0)) / bandwidth
  )


def _variant(config, n_layers: int, windows: tuple[int, ...]):
  """The config at one micro-batch, grad_accum 1, `n_layers` unrolled layers."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.batch_size = config.batch_size // config.grad_accum
    c.grad_accum = 1
    c.execution.scan_layers = False
    c.model.overrides.n_layers = n_layers
    c.model.overrides.layer_windows = list(windows[:n_layers])
  return c


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis() or {}
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def compile_cost(config, mesh, build: Callable) -> dict:
  """cost_analysis() of `build(config, cfg, mesh).step` compiled for `mesh`."""
  program = build(config, model_config(config), mesh).step
  with jax.set_mesh(mesh):
    return _cost(program.jitted.lower(*program.args).compile())


def estimate(
  config,
  mesh,
  build: Callable,
  peak_tflops_per_device: float,
  step_flops: float,
  attention_impl: str,
  layers: int | None = None,
) -> dict[str, Any]:
  """Estimated step seconds, MFU and their breakdown for a training config's step.

  `build(config, cfg, mesh)` gives the Steps (the planner's step builder); `step_flops`
  is the step's model FLOPs (the MFU numerator); `attention_impl` the resolved
  backend (only 'splash' runs uncosted kernels). `layers` forces the depth of the
  smaller compile (the larger is twice it); default: the window pattern's period.
  A cost model whose time does not grow with depth is replaced by the roofline of the
  same compiles (`roofline_seconds`, stated in `estimate_method`, the cost model's
  figures in `estimate_points`), or gives `estimate_error` where the chip's HBM
  bandwidth is unknown.
  """
  if config.batch_size % config.grad_accum:
    raise ConfigError(
      f"batch_size={config.batch_size} is not a multiple of grad_accum={config.grad_accum}"
    )
  cfg = model_config(config)
  windows = tuple(cfg.layer_windows)
  p = layers or window_period(windows)
  if p < 1:
    raise ConfigError(f"estimate: layers={p} must be >= 1")
  peak = peak_tflops_per_device * 1e12
  if 2 * p <= cfg.n_layers:  # two depths, extrapolated linearly in layers
    lo = compile_cost(_variant(config, p, windows), mesh, build)
    hi = compile_cost(_variant(config, 2 * p, windows), mesh, build)
    points = {n: float(c.get("optimal_seconds", 0.0)) for n, c in ((p, lo), (2 * p, hi))}
    costs = [lo, hi]
    method = f"unrolled {p} and {2 * p} layers, linear in layers to {cfg.n_layers}"
  else:  # shallow enough to compile every layer unrolled
    costs = [compile_cost(_variant(config, cfg.n_layers, windows), mesh, build)]
    points = {cfg.n_layers: float(costs[0].get("optimal_seconds", 0.0))}
    method = f"unrolled {cfg.n_layers} layers (full depth)"
  fallback = None
  lo_s, hi_s = points[min(points)], points[max(points)]
  if not (0 < lo_s < hi_s if len(points) == 2 else lo_s > 0):
    # More layers must cost more. A cost model that says otherwise (libtpu's for v6e
    # scores some 32B steps negative) is replaced by a roofline of the same compile's
    # FLOPs and bytes, when the chip's HBM bandwidth is known, rather than extrapolated
    # into a negative time; else the plan reports the points and no estimate.
    bandwidth = hbm_bytes_per_second(mesh)
    if bandwidth is None:
      return {
        "estimate_error": f"cost model optimal_seconds by unrolled layers {points} does "
        "not grow with depth: no estimate",
        "estimate_points": points,
      }
    for c in costs:
      c["optimal_seconds"] = roofline_seconds(c, peak, bandwidth)
    fallback = points
  if len(costs) == 2:
    lo, hi = costs
    scale = (cfg.n_layers - p) / p
    xla = {
      k: float(lo.get(k, 0.0)) + (float(hi.get(k, 0.0)) - float(lo.get(k, 0.0))) * scale
      for k in ("optimal_seconds", "flops", "bytes accessed")
    }
  else:
    xla = {k: float(costs[0].get(k, 0.0)) for k in ("optimal_seconds", "flops", "bytes accessed")}
  if not xla["optimal_seconds"] > 0:
    return {"estimate_error": f"cost model optimal_seconds {xla['optimal_seconds']}: no estimate"}
  accum = config.grad_accum
  micro = config.batch_size // accum
  run = execution_config(config)
  kernel = 0.0
  if attention_impl == "splash":
    kernel = kernel_flops_per_device(
      cfg,
      config.seq_len,
      micro,
      dict(mesh.shape),
      reruns_attention_forward(run.remat_policy),
      run.context_parallel,
      run.splash_fused_backward,
    ) / (peak * KERNEL_EFFICIENCY)
  xla_seconds = xla["optimal_seconds"] * accum
  matmul = min(xla["flops"] * accum / peak, xla_seconds)
  seconds = xla_seconds + kernel * accum
  devices = mesh.size
  source = "TPU cost model (optimal_seconds)"
  if fallback is not None:
    source = (
      f"roofline max(flops / peak, bytes accessed / HBM bandwidth) per compile (the cost "
      f"model's optimal_seconds {fallback} did not grow with depth)"
    )
  extra = {"estimate_points": fallback} if fallback is not None else {}
  return {
    "estimated_step_seconds": seconds,
    "estimated_mfu": step_flops / (devices * peak * seconds),
    "estimated_seconds_by_kind": {
      "matmul": matmul,
      "attention_kernels": kernel * accum,
      "other": xla_seconds - matmul,
    },
    "estimate_method": (
      f"{source} of the step {method}, x grad_accum "
      f"{accum}; splash kernels analytic at {KERNEL_EFFICIENCY:.0%} of peak"
    ),
    "estimated_xla_flops_per_device": xla["flops"] * accum,
    "estimated_bytes_accessed_per_device": xla["bytes accessed"] * accum,
    "kernel_efficiency": KERNEL_EFFICIENCY if attention_impl == "splash" else None,
    **extra,
  }
