"""The device mesh: axes `data`, `fsdp`, `tensor`, `sequence` sized by config.

A size of -1 fills the devices left over by the other axes (at most one -1).
Errors are `MeshError` (a `ConfigError`) naming the `mesh.*` fields.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from cwm_jax.base import ConfigError, check_fields

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")


class MeshError(ConfigError):
  """The mesh shape does not fit the devices."""


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves `{axis: size}` (one size may be -1) to a shape over `n_devices`."""
  check_fields(sizes, MESH_AXES, "mesh", "axes", error=MeshError)
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, shape) if s == -1]
  bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, shape) if s == 0 or s < -1]
  if bad or len(fill) > 1:
    raise MeshError(f"invalid mesh sizes {bad or fill}: use sizes >= 1 and at most one -1")
  fixed = math.prod(s for s in shape if s != -1)
  desc = ",".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, shape))
  if fill:
    if n_devices % fixed:
      raise MeshError(
        f"{desc}: the fixed axes (product {fixed}) do not divide the "
        f"{n_devices} devices; change mesh.* so their product divides it"
      )
    shape[MESH_AXES.index(fill[0])] = n_devices // fixed
  elif fixed != n_devices:
    raise MeshError(
      f"{desc}: product {fixed} != {n_devices} devices; set one "
      "mesh.* size to -1 or make the product equal the device count"
    )
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types over `devices` (default: all devices). Devices of several
  TPU slices (multislice) get the hybrid ICI x DCN mesh of `multislice_mesh`."""
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices(devices)
  if slices > 1:
    return multislice_mesh(sizes, devices, slices)
  grid = device_grid(mesh_shape(sizes, len(devices)), devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """`devices` laid out in `shape`: a whole TPU slice on its torus (`mesh_utils`), a share
  of one (the trainer's or the rollouts' chips of every host) in `share_order`, other
  devices (CPU, GPU) in their order. The runtime and the planner lay meshes out here."""
  try:
    grid = mesh_utils.create_device_mesh(
      tuple(shape), list(devices), allow_split_physical_axes=True
    )
  except (ValueError, NotImplementedError, AssertionError):  # not a whole slice
    grid = np.asarray(share_order(devices), dtype=object).reshape(tuple(shape))
  return np.asarray(grid)


def share_order(devices: Sequence[jax.Device]) -> list[jax.Device]:
  """A share of a 2-D torus that is one colour of its checkerboard (each 2x2 host halved
  by `transfer.split_devices`) runs along the torus's diagonals: device `j * side + i` sits
  at `((i + j + c) % side, (i - j) % side)`, so the mesh's minor axis follows a diagonal
  and the next one steps across them. libtpu compiles collectives along such lines and
  refuses them over every other row or column of the torus. Any other share keeps its
  order."""
  devices = list(devices)
  coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
  if not coords or any(len(c) < 2 or any(c[2:]) for c in coords):
    return devices
  side = max(c[0] for c in coords) + 1
  colour = {(c[0] + c[1]) % 2 for c in coords}
  at = {c[:2]: d for c, d in zip(coords, devices)}
  if (
    len(colour) != 1
    or side % 2
    or max(c[1] for c in coords) + 1 != side
    or len(at) != len(devices)
    or len(devices) != side * side // 2
  ):
    return devices
  (c,) = colour
  return [at[((i + j + c) % side, (i - j) % side)] for j in range(side // 2) for i in range(side)]


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices the devices span (1 for CPU and GPU devices)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def multislice_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device], slices: int) -> Mesh:
  """The mesh over several TPU slices: `data` is split into `slices` groups across the
  data-centre network (DCN), every other axis stays inside a slice (ICI). The planner
  (`plan --num_slices`) compiles the same mesh."""
  shape = mesh_shape(sizes, len(devices))
  data = shape[MESH_AXES.index("data")]
  if data % slices:
    raise MeshError(
      f"mesh.data={data} must be a multiple of --num_slices={slices} (the "
      "slices the devices span): only the data axis spans slices"
    )
  ici = tuple(s // slices if a == "data" else s for a, s in zip(MESH_AXES, shape))
  dcn = tuple(slices if a == "data" else 1 for a in MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(
    ici, dcn, list(devices), allow_split_physical_axes=True
  )
  return Mesh(np.asarray(grid), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh_sizes: Mapping[str, int], axes: Sequence[str]) -> int:
  """Product of the resolved sizes of `axes`."""
  return math.prod(mesh_sizes[a] for a in axes)


# A lost host must end the job, not hang it: every process's client and the coordinator
# declare a peer dead after this many seconds without its heartbeat, and the
# survivors then exit with an error (a collective with a dead peer fails sooner, when
# its connection drops). A relaunch resumes from the last committed checkpoint.
HEARTBEAT_TIMEOUT_S = 60
# How long the final barrier waits for every process at a clean (or preempted) exit.
SHUTDOWN_TIMEOUT_S = 120


def initialize_distributed(
  coordinator: str = "",
  num_processes: int = 0,
  process_id: int = -1,
  *,
  heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
  shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> None:
  """`jax.distributed.initialize` from arguments or JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID; a no-op for a single process.

  CPU processes use gloo collectives. JAX's preemption service is on: a SIGTERM to
  any process (a cluster's preemption notice) reaches every process's
  `reached_preemption_sync_point`, so all of them save the same step.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if not coordinator or num_processes <= 1:
    return
  if process_id < 0:
    raise MeshError("multi-process run needs a process id: --process_id or JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_s,
    shutdown_timeout_seconds=shutdown_timeout_s,
  )
