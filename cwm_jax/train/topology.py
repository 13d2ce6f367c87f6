"""Cloud TPU slices without a TPU: accelerator types, chip figures, compile-only devices.

`slice_spec('v5p-512')` or `slice_spec('v5p:8x8x4')` names a TPU slice;
`devices(spec, num_slices)` asks libtpu (`pip install 'jax[tpu]'`, imported
here only) for the compile-only devices of that topology, on a CPU-only
machine, so `jax.jit(...).lower(...).compile()` runs the real TPU compiler.
Accelerator types count TensorCores: two per chip on v4 and v5p
(`v5p-512` = 256 chips = `v5p:4x8x8`), one per chip on v5e and v6e
(`v6e-256` = 256 chips = `v6e:16x16`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies

from cwm_jax.base import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation."""

  name: str  # topology prefix: v4, v5p, v5e, v6e
  hbm_gib: float  # HBM per chip
  peak_tflops: float  # dense bf16 TFLOP/s per chip
  cores_per_chip: int  # TensorCores counted by the accelerator type's number
  dims: int  # torus dimensions (3 for v4/v5p, 2 for v5e/v6e)


CHIPS = {
  "v4": Chip("v4", 32.0, 275.0, 2, 3),
  "v5p": Chip("v5p", 95.0, 459.0, 2, 3),
  "v5e": Chip("v5e", 16.0, 197.0, 1, 2),
  "v6e": Chip("v6e", 32.0, 918.0, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  chip: Chip
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    return f"{self.chip.name}:" + "x".join(map(str, self.shape))


def default_shape(chip: Chip, chips: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape for a chip count: from 2x2(x1), double the smallest
  axis (the last of equals) until the count is reached."""
  if chips == 1:
    return (1,) * chip.dims
  shape = [2, 2] + [1] * (chip.dims - 2)
  if chips < 4 or chips & (chips - 1):
    raise ConfigError(
      f"{chips} {chip.name} chips is not a slice size; use a power of two >= 4 "
      f"(or give the topology, e.g. {chip.name}:" + "x".join(["2"] * chip.dims) + ")"
    )
  while math.prod(shape) < chips:
    i = max(j for j, s in enumerate(shape) if s == min(shape))
    shape[i] *= 2
  return tuple(shape)


def slice_spec(text: str) -> SliceSpec:
  """'v5p-512' (accelerator type) or 'v5p:4x8x8' (topology) -> SliceSpec."""
  m = re.fullmatch(r"\s*(v\d+[a-z]*)\s*([-:])\s*([\dx]+)\s*", text or "")
  name = m and ALIASES.get(m.group(1), m.group(1))
  if not m or name not in CHIPS:
    raise ConfigError(
      f"--topology {text!r}: use an accelerator type such as v5p-512 or "
      f"v6e-256, or a topology such as v5p:4x8x8; chips: {sorted(CHIPS)}"
    )
  chip = CHIPS[name]
  if m.group(2) == ":":
    shape = tuple(int(s) for s in m.group(3).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      raise ConfigError(
        f"--topology {text!r}: {name} topologies have {chip.dims} axes, "
        f"e.g. {name}:" + "x".join(["2"] * chip.dims)
      )
    return SliceSpec(chip, shape)
  cores = int(m.group(3))
  if cores % chip.cores_per_chip:
    raise ConfigError(
      f"--topology {text!r}: {name} types count TensorCores, "
      f"{chip.cores_per_chip} per chip; use an even number"
    )
  return SliceSpec(chip, default_shape(chip, cores // chip.cores_per_chip))


def devices(spec: SliceSpec, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices of `spec` (needs libtpu).

  Compile-only devices never open a chip, so several planners (or tests) may
  load libtpu at once: its single-process lockfile is waived for them.
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(
      platform="tpu", topology_name=spec.topology, num_slices=int(num_slices)
    )
  except (ImportError, RuntimeError) as e:
    raise ConfigError(
      f"TPU topology {spec.topology} x{num_slices}: libtpu could not describe "
      f"it ({str(e).splitlines()[0][:200]}); install it with "
      "`bash launch/install.sh .venv tpu` (jax[tpu])"
    ) from e
  return list(desc.devices)


def devices_per_chip(devs) -> int:
  """Devices per chip: 1 with megacore (v5p), 2 where libtpu lists each TensorCore (v4)."""
  chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devs}
  return len(devs) // len(chips)
