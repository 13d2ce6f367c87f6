"""Where a step runs, and the attention backend 'auto' picks for it.

The platform is that of the devices the step is being traced for: the mesh set
by `jax.set_mesh` (a CPU-side compile for a TPU topology counts as TPU), else
JAX's default backend. 'auto' is splash on TPU, cuDNN on GPU, chunked elsewhere.
"""

from __future__ import annotations

import jax

AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}
FALLBACK = "chunked"


def target_platform() -> str:
  """'tpu', 'gpu', 'cpu', ...: of the current mesh's devices, else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None)
  return platform or jax.default_backend()


def resolve(impl: str, platform: str | None = None) -> str:
  """`impl`, with 'auto' replaced by the backend for `platform` (default: `target_platform()`)."""
  if impl != "auto":
    return impl
  return AUTO.get(platform or target_platform(), FALLBACK)
