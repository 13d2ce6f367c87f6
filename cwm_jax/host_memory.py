"""Host memory for runs on the CPU backend: glibc's malloc set to keep what it frees.

XLA:CPU allocates each execution's temporaries as one block (hundreds of MB for the
train step of `benchmarks/train_step.py`) and frees it when the execution ends. glibc
serves a block that size with `mmap` and hands it back with `munmap`, so every step
touches that many fresh, kernel-zeroed pages again, and the kernel time to fault them in
is a visible share of a CPU step.
`retain()` makes malloc keep freed memory for reuse: one arena (XLA's worker threads
would otherwise allocate from arenas of their own, which `mmap` anything above 64 MB),
no `mmap`, no trimming. The next step then reuses the block (no page faults, next to no
kernel time).
The cost: the process keeps its peak heap until it exits, and that peak holds the
temporaries of executions that overlap (one freed after the next one's allocation), so
with several steps in flight the process stays at a multiple of one step's temporaries.

A thread keeps the arena it first allocated from, so this takes effect only before JAX
starts its thread pools (before any backend is initialized); `cli.run_main` calls it for
every program, the benchmarks at their start. `CWM_JAX_HOST_MALLOC=retain|system`
decides; unset, memory is retained when the run will use the CPU backend (JAX_PLATFORMS
is 'cpu', or unset on a machine with no accelerator device nodes).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

from cwm_jax.base import ConfigError

ENV = "CWM_JAX_HOST_MALLOC"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def cpu_run() -> bool:
  """Whether JAX will run on its CPU backend, decided without initializing a backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def _backends_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")  # no jax imported: nothing started
  return bridge is not None and bridge.backends_are_initialized()


def retain() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring), if `ENV` asks
  for it or, unset, on a CPU run. True when the setting took effect; False where it was
  not asked for, JAX's backends have started already, or the C library is not glibc."""
  choice = os.environ.get(ENV, "").strip().lower()
  if choice not in ("", "retain", "system"):
    raise ConfigError(
      f"{ENV}={choice!r}: use 'retain' (keep freed host memory for reuse) "
      "or 'system' (glibc's defaults), or leave it unset"
    )
  if choice == "system" or (not choice and not cpu_run()) or _backends_started():
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    return False
  # The trim threshold is a size_t inside glibc, so -1 reads as SIZE_MAX: never trim.
  # The largest positive int (2 GiB) still trimmed: a few steps in flight can leave a free
  # top above it, which glibc gave back and then faulted in again at every step.
  return all(
    mallopt(param, value) == 1
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  )
