"""NVIDIA GPU clusters without a GPU: target configs, compile-only devices, plans.

`cluster_spec('h100:2x8')` names 2 hosts of 8 H100s (`'h100x8'`: one host);
`devices(spec)` asks the CUDA PJRT plugin (`pip install 'jax[cuda12]==<jax
version>'`, about 5 GB; JAX loads it on first use) for compile-only devices built from
an XLA GPU target config, on a CPU-only machine, so `jax.jit(...).lower(...)
.compile()` runs the real GPU compiler and `memory_analysis()` gives per-GPU
figures (the GPU compiler gives no `cost_analysis()` this way; FLOPs are
analytic anyway). `gpu_plan` plans every stage of a training config on such a
cluster, as `planning.tpu_plan` does for a TPU slice.

The target configs are XLA `GpuTargetConfigProto`s written from NVIDIA's public
figures (SM count, shared memory, L2, clock, memory size and bandwidth);
autotuning is off without a device, so the figures shape fusion choices only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from jax.experimental import topologies

from cwm_jax.base import ConfigError
from cwm_jax.kernels import cudnn
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.train import planning

GIB = 2**30

_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} threads_per_core_limit: 2048 core_count: {sms}
  fpus_per_core: {fpus} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: {l2}
  clock_rate_ghz: {clock} device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{kind}"
"""


@dataclasses.dataclass(frozen=True)
class Gpu:
  """Public figures of one NVIDIA GPU model."""

  name: str
  kind: str  # device_kind as JAX reports it
  hbm_gib: float
  peak_tflops: float  # dense bf16
  capability: str  # CUDA compute capability
  sms: int
  fpus_per_sm: int
  smem_per_sm: int  # bytes
  smem_optin: int  # bytes per block, opt-in
  l2_bytes: int
  bandwidth: float  # bytes/s
  clock_ghz: float

  def target_config(self) -> str:
    major, minor = self.capability.split(".")
    return _TARGET.format(
      smem_core=self.smem_per_sm,
      sms=self.sms,
      fpus=self.fpus_per_sm,
      bandwidth=int(self.bandwidth),
      l2=self.l2_bytes,
      clock=self.clock_ghz,
      memory=int(self.hbm_gib * GIB),
      smem_optin=self.smem_optin,
      major=major,
      minor=minor,
      kind=self.kind,
    )


GPUS = {
  "h100": Gpu(
    "h100",
    "NVIDIA H100 80GB HBM3",
    79.6,
    989.0,
    "9.0",
    132,
    128,
    233472,
    232448,
    50 * 2**20,
    3.35e12,
    1.98,
  ),
  "h200": Gpu(
    "h200", "NVIDIA H200", 140.4, 989.0, "9.0", 132, 128, 233472, 232448, 50 * 2**20, 4.8e12, 1.98
  ),
  "a100": Gpu(
    "a100",
    "NVIDIA A100-SXM4-80GB",
    80.0,
    312.0,
    "8.0",
    108,
    64,
    167936,
    166912,
    40 * 2**20,
    2.04e12,
    1.41,
  ),
}


@dataclasses.dataclass(frozen=True)
class Cluster:
  gpu: Gpu
  hosts: int
  per_host: int

  @property
  def size(self) -> int:
    return self.hosts * self.per_host

  @property
  def name(self) -> str:
    return f"{self.gpu.name}:{self.hosts}x{self.per_host}"


def cluster_spec(text: str) -> Cluster:
  """'h100x8' (one host of 8) or 'h100:4x8' (4 hosts of 8) -> Cluster."""
  m = re.fullmatch(r"\s*([a-z]\d+)\s*(?:x(\d+)|:(\d+)x(\d+))\s*", (text or "").lower())
  if not m or m.group(1) not in GPUS:
    raise ConfigError(
      f"--gpus {text!r}: use GPUxN (one host, e.g. h100x8) or GPU:HOSTSxN "
      f"(e.g. h100:4x8); GPUs: {sorted(GPUS)}"
    )
  hosts, per_host = (1, int(m.group(2))) if m.group(2) else (int(m.group(3)), int(m.group(4)))
  if hosts < 1 or per_host < 1:
    raise ConfigError(f"--gpus {text!r}: host and GPU counts must be >= 1, e.g. h100:4x8")
  return Cluster(GPUS[m.group(1)], hosts, per_host)


def devices(spec: Cluster) -> list:
  """Compile-only CUDA devices of `spec` (needs the CUDA plugin, not a GPU)."""
  # The plugin's import-time check asks the driver for GPUs; compiling needs none.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  try:
    desc = topologies.get_topology_desc(
      spec.gpu.name,
      platform="cuda",
      target_config=spec.gpu.target_config(),
      topology=f"1x{spec.hosts}x{spec.per_host}",
    )
  except (RuntimeError, NotImplementedError) as e:
    raise ConfigError(
      f"GPU target {spec.name}: the CUDA plugin could not describe it "
      f"({str(e).splitlines()[0][:200]}); install it with `pip install "
      "'jax[cuda12]==<your jax version>'` and set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before "
      "JAX starts on a machine without a GPU"
    ) from e
  return list(desc.devices)


def gpu_plan(
  configs: list[tuple[str, Any]],
  gpus: str,
  mesh_text: str | None = None,
  hbm_gb: float | None = None,
  step_builders: dict | None = None,
) -> dict:
  """Plans each (name, training config) for a GPU cluster with the real GPU compiler.

  Fits when the largest compiled program's total per GPU, with its resident arrays,
  is within its memory (or `hbm_gb`); otherwise `planning.NotFitting` naming the
  stage, the program and the figures.
  """
  spec = cluster_spec(gpus)
  devs = devices(spec)
  limit = hbm_gb if hbm_gb is not None else spec.gpu.hbm_gib
  extra = dict(
    gpus=spec.name, gpu_hbm_gib=spec.gpu.hbm_gib, peak_tflops_per_gpu=spec.gpu.peak_tflops
  )
  with cudnn.compiling_for(spec.gpu.capability):
    return planning._plan_stages(  # pylint: disable=protected-access
      configs,
      devs,
      lambda c, d: mesh_lib.make_mesh(dict(c.mesh), d),
      spec.gpu.peak_tflops,
      limit,
      mesh_text,
      step_builders,
      spec.name,
      extra,
    )
