"""Disaggregated meshes: the job's devices split into a trainer mesh and a rollout mesh,
and the weight sync that moves the trainer's params onto the rollout replicas.

Every process gives the same number of its own devices to each side, so both meshes
span every process and every process runs the same programs (multi-controller JAX):
of `n` trainer and `m` rollout devices, a process holds `n / P` and `m / P`.

The rollout mesh is laid out for decoding: `tensor` devices per replica (the params
split over them), replicas over `data` (rows split over them), `fsdp` and `sequence` 1,
so the training rules (`parallel.sharding`) shard both meshes. Its devices form `m / n`
groups of `n`, each paired device for device with the trainer's: trainer device `i`
and group device `i` sit on the same process.

A weight sync (`WeightSync`) then never leaves the devices: the params are cast to the
rollout dtype and resharded on the trainer devices into the rollout layout (a staging
mesh of the trainer's devices in the group's shape: a collective inside the trainer
mesh), and each staged shard is copied to its paired device in every group (a local
device-to-device copy). Cross-process `device_put` between disjoint device sets is not
supported by multi-controller JAX, so the pairing is what keeps the copy local.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding


def split_errors(
  n_devices: int, n_processes: int, rollout_devices: int, tensor: int, rollout_rows: int
) -> list[str]:
  """Why `rollout_devices` of `n_devices` (over `n_processes` processes) cannot hold a
  rollout mesh of `tensor`-way replicas sampling `rollout_rows` rows; [] if they can.
  Arithmetic only: the planner checks a slice's host count without its devices."""
  trainer = n_devices - rollout_devices
  if not 0 < rollout_devices < n_devices:
    return [f"rl.rollout_devices={rollout_devices} must be in (0, {n_devices}) (0: colocated)"]
  errors = []
  if rollout_devices % n_processes or trainer % n_processes:
    errors.append(
      f"rl.rollout_devices={rollout_devices} and the {trainer} trainer devices must "
      f"each split evenly over the {n_processes} processes (every process holds both)"
    )
  if rollout_devices % trainer:
    errors.append(
      f"rl.rollout_devices={rollout_devices} must be a multiple of the {trainer} trainer "
      "devices (each trainer device feeds one device of every rollout group)"
    )
  if tensor < 1 or trainer % tensor:
    errors.append(
      f"rl.rollout_tensor={tensor} must divide the {trainer} trainer devices (a rollout "
      "group has as many devices as the trainer)"
    )
  elif (trainer // n_processes) % tensor and tensor % max(trainer // n_processes, 1):
    errors.append(
      f"rl.rollout_tensor={tensor} must divide or be a multiple of the "
      f"{trainer // n_processes} trainer devices per process (replicas align with hosts)"
    )
  if not errors and rollout_rows % (rollout_devices // tensor):
    errors.append(
      f"{rollout_rows} rollout rows per update do not divide over the "
      f"{rollout_devices // tensor} rollout replicas ({rollout_devices} devices / "
      f"rl.rollout_tensor={tensor}); change batch_size, rl.rollout_devices or rl.rollout_tensor"
    )
  return errors


def _host_order(d: jax.Device) -> tuple[int, int]:
  """A host's chips checkerboard-first (by the parity of their torus coordinates), then by
  id. Halving a host then gives each side a checkerboard of the slice: libtpu refuses any
  collective over a v6e subset made of every other row or column of the torus (the first
  two chips of each 2x2 host), and compiles a checkerboard's (laid out by
  `mesh.share_order`). Devices without coordinates (CPU, GPU) keep their id order."""
  coords = getattr(d, "coords", None)
  return (sum(coords) % 2 if coords is not None else 0, d.id)


def split_devices(
  rollout_devices: int, devices: Sequence[jax.Device] | None = None
) -> tuple[list[jax.Device], list[list[jax.Device]]]:
  """(trainer devices, rollout devices per process): each process's devices, in
  `_host_order`, give their first share to the trainer and the rest to rollouts."""
  devices = list(devices if devices is not None else jax.devices())
  procs = sorted({d.process_index for d in devices})
  local = {p: sorted((d for d in devices if d.process_index == p), key=_host_order) for p in procs}
  per = rollout_devices // len(procs)
  trainer = [d for p in procs for d in local[p][: len(local[p]) - per]]
  return trainer, [local[p][len(local[p]) - per :] for p in procs]


def _grid(flat: Sequence[jax.Device], tensor: int) -> np.ndarray:
  """Devices in mesh order (data, fsdp, tensor, sequence) with `tensor` consecutive
  devices per replica."""
  return np.asarray(flat, dtype=object).reshape(len(flat) // tensor, 1, tensor, 1)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The rollout mesh, the staging mesh (trainer devices in a group's shape) and the
  groups' device grids (group `j`'s device at a grid position pairs with the staging
  mesh's device there)."""

  mesh: Mesh
  staging: Mesh
  groups: tuple[np.ndarray, ...]

  @property
  def replicas(self) -> int:
    return self.mesh.shape["data"]


def layout(
  trainer: Sequence[jax.Device], rollout_by_process: Sequence[Sequence[jax.Device]], tensor: int
) -> Layout:
  """The disaggregated layout of `split_devices`' output, `tensor` devices per replica."""
  per_process = len(trainer) // len(rollout_by_process)
  k = len(rollout_by_process[0]) // per_process
  groups = tuple(
    _grid(
      [d for local in rollout_by_process for d in local[j * per_process : (j + 1) * per_process]],
      tensor,
    )
    for j in range(k)
  )
  axes = mesh_lib.MESH_AXES
  auto = (jax.sharding.AxisType.Auto,) * len(axes)
  return Layout(
    Mesh(np.concatenate(groups, axis=0), axes, axis_types=auto),
    Mesh(_grid(trainer, tensor), axes, axis_types=auto),
    groups,
  )


def rollout_specs(param_specs):
  """The params' specs on the rollout mesh: the training specs minus the axes that are
  size 1 there (fsdp, sequence) and never `data` (every replica holds whole params)."""

  def keep(entry):
    axes = tuple(a for a in sharding.spec_axes(entry) if a == "tensor")
    return axes[0] if axes else None

  return jax.tree.map(lambda s: P(*map(keep, s)), param_specs, is_leaf=lambda x: isinstance(x, P))


def sync_bytes(abstract_params, specs, mesh_shape: dict, dtype=None) -> int:
  """Bytes the rollout devices receive per weight sync: each holds its shard of every
  param in the rollout dtype (None: the params' own)."""
  devices = math.prod(mesh_shape.values())
  total = 0
  for leaf, spec in zip(
    jax.tree.leaves(abstract_params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  ):
    itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
    split = math.prod(mesh_shape[a] for entry in spec for a in sharding.spec_axes(entry))
    total += math.prod(leaf.shape) * itemsize // split
  return total * devices


class WeightSync:
  """Trainer params -> params on the rollout replicas, device to device, each sync
  tagged with the policy version it carries (`version`)."""

  def __init__(self, lay: Layout, param_specs, dtype=None):
    """`dtype`: the replicas' param dtype (None: the trainer's, copied exactly)."""
    self.layout, self.dtype = lay, None if dtype is None else jnp.dtype(dtype)
    specs = rollout_specs(param_specs)
    self.staged = sharding.named(lay.staging, specs)
    self.target = sharding.named(lay.mesh, specs)
    self._cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(self.dtype), p))
    self.version = -1
    # Each staging device of this process and the group devices its shard is copied to.
    self._paired = [
      (t, [group[idx] for group in lay.groups])
      for idx, t in np.ndenumerate(lay.staging.devices)
      if t.process_index == jax.process_index()
    ]

  def __call__(self, params, version: int):
    """The rollout copy of `params` (the trainer's, left as they are) as `version`."""
    staged = jax.device_put(params if self.dtype is None else self._cast(params), self.staged)
    out = jax.tree.map(self._copy, staged, self.target)
    self.version = version
    return out

  def _copy(self, staged: jax.Array, target: NamedSharding) -> jax.Array:
    by_device = {s.device: s.data for s in staged.addressable_shards}
    pairs = [(by_device[t], dev) for t, devices in self._paired for dev in devices]
    moved = jax.device_put([data for data, _ in pairs], [dev for _, dev in pairs])
    return jax.make_array_from_single_device_arrays(staged.shape, target, moved)


def host_allgather(x: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Every process's `x` (same shape and dtype everywhere), stacked [processes, ...],
  gathered over `mesh`'s devices only: the trainer's devices, busy with an update,
  are not involved (`multihost_utils.process_allgather` uses every device)."""
  x = np.asarray(x)
  firsts = {}
  for d in sorted(mesh.devices.flat, key=lambda d: d.id):
    firsts.setdefault(d.process_index, d)
  if len(firsts) == 1:
    return x[None]
  devices = [firsts[p] for p in sorted(firsts)]
  line = Mesh(np.asarray(devices, dtype=object), ("processes",))
  mine = firsts[jax.process_index()]
  stacked = jax.make_array_from_single_device_arrays(
    (len(devices),) + x.shape,
    NamedSharding(line, P("processes")),
    [jax.device_put(x[None], mine)],
  )
  with jax.set_mesh(line):  # under a caller's mesh context, jit would expect its devices
    out = jax.jit(lambda a: a, out_shardings=NamedSharding(line, P()))(stacked)
  return np.asarray(out.addressable_shards[0].data)
