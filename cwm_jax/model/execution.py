"""How a model runs, apart from what it is: dtypes, attention backend, scan, remat.

`Execution` holds every execution choice; `ModelConfig` holds the architecture
(what config.json / params.json describe). Checkpoints and exports store the
architecture only, so one checkpoint runs under any execution: a bf16 scanned
step with splash attention on a TPU pod, a float32 unrolled reference on a CPU.
Training configs carry it as their `execution` section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cwm_jax.base import ConfigError, check_fields
from cwm_jax.kernels.cudnn import check_gpu_dtypes

# 'full' recomputes the whole layer in the backward pass; 'attention' everything but the
# attention kernels' forward (their output and log-sum-exp are kept); 'dots' and
# 'dots_no_batch' keep matmul outputs too (jax.checkpoint_policies of those names).
REMAT_POLICIES = ("none", "full", "attention", "dots", "dots_no_batch")
# 'auto': splash on TPU, cuDNN on GPU, chunked on CPU, from the devices compiled for.
ATTENTION_IMPLS = ("auto", "reference", "chunked", "cudnn", "splash")
CONTEXT_PARALLEL = ("none", "allgather", "ring", "zigzag")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Execution:
  """Execution policy of a model; hashable, so it can be static under jit.

  `attention_impl` 'auto' (the default) is the target devices' kernel (splash on
  TPU, cuDNN on GPU in bf16, chunked otherwise); 'reference' is the dense O(T^2)
  oracle. `global_attention_impl` ("" = `attention_impl`) is the backend of global
  layers. `attention_chunk` is the block rows of the blockwise kernels; 0 picks
  them per platform and length (`kernels.backend.resolve_chunk`).
  `attention_max_segments` is M, the documents per row cuDNN's packed layout
  describes (0: `cudnn.default_max_segments(T)`); a batch with a row of more
  documents runs the chunked fallback. cuDNN's backward pass works over all M
  slots of a row, so a smaller M is faster (benchmarks/gpu_mfu.py).
  `context_parallel` shards global layers' attention over the mesh's
  `sequence` axis ('allgather' or 'ring'; local layers then exchange only a
  window-sized K/V halo); 'zigzag' holds chunks r and 2n - 1 - r of the sequence
  on shard r so that causal work is even over the shards, and every layer
  all-gathers K/V (`kernels.context_parallel`). It is active only when that axis
  has size > 1. `splash_fused_backward` runs splash's backward as one kernel
  (dq with dk and dv: fewer matmuls, a partial dq per key block in temporaries;
  `kernels.splash.block_sizes`), for short sequences.
  """

  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  attention_impl: str = "auto"
  global_attention_impl: str = ""
  attention_chunk: int = 0
  attention_max_segments: int = 0
  scan_layers: bool = True
  remat_policy: str = "none"
  context_parallel: str = "none"
  splash_fused_backward: bool = False

  def __post_init__(self):
    errors = []
    if self.attention_chunk < 0:
      errors.append(f"attention_chunk={self.attention_chunk} must be >= 1 (or 0: auto)")
    if self.attention_max_segments < 0 or self.attention_max_segments == 1:
      errors.append(
        f"attention_max_segments={self.attention_max_segments} must be >= 2 (or 0: auto)"
      )
    for name, allowed in (
      ("param_dtype", DTYPES),
      ("compute_dtype", DTYPES),
      ("attention_impl", ATTENTION_IMPLS),
      ("global_attention_impl", ("",) + ATTENTION_IMPLS),
      ("remat_policy", REMAT_POLICIES),
      ("context_parallel", CONTEXT_PARALLEL),
    ):
      if getattr(self, name) not in allowed:
        errors.append(f"{name}={getattr(self, name)!r} must be one of {allowed}")
    if not errors and "cudnn" in (self.attention_impl, self.global_attention_impl):
      try:
        check_gpu_dtypes(self.compute_dtype)
      except ConfigError as e:
        errors.append(str(e))
    if errors:
      raise ConfigError("invalid execution config: " + "; ".join(errors))

  def replace(self, **kw: Any) -> Execution:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any] | None) -> Execution:
    """From a config section; unknown fields are a ConfigError naming them."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    check_fields(values, known, "execution")
    return cls(**values)


FIELDS = tuple(f.name for f in dataclasses.fields(Execution))


def reruns_attention_forward(remat_policy: str) -> bool:
  """Whether a step under `remat_policy` runs the attention kernels' forward twice:
  only 'full' drops their residuals (`kernels.backend.RESIDUALS`), and 'none' has no
  recompute at all."""
  return remat_policy == "full"
