"""Where a step runs, the attention backend 'auto' picks for it, and the forms it traces.

The platform is that of the devices the step is being traced for: the mesh set
by `jax.set_mesh` (a CPU-side compile for a TPU topology counts as TPU), else
JAX's default backend. 'auto' is splash on TPU, cuDNN on GPU, chunked elsewhere.

`forms()` is the one place that picks the CPU specialisations: XLA:CPU runs some
computations faster in another form than the one an accelerator's compiler wants
(merged GEMMs, a flipped RoPE, joined q/k/v, ...). Each site that has two forms reads
its flag from `forms()`; both forms compute the same values, and the tests check
each against the other or a reference on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}
FALLBACK = "chunked"
GPU_DTYPES = ("bfloat16", "float16")  # what cuDNN flash attention computes in
# `jax.ad_checkpoint.checkpoint_name` of what the splash and chunked kernels' backward
# passes read besides q, k and v (the output and its log-sum-exp): a remat policy that
# saves this name keeps the attention forward from running again in the backward pass.
RESIDUALS = "attention_residuals"


def target_platform() -> str:
  """'tpu', 'gpu', 'cpu', ...: of the current mesh's devices, else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None)
  return platform or jax.default_backend()


@dataclasses.dataclass(frozen=True)
class Forms:
  """Which form of each platform-specialised computation a step traces: True for the
  CPU form, False for the accelerator form.

  `merged_gemms`: `model.ops.dense` and the MLP merge the token dims into one 2-D GEMM
  (else contractions over [B, T, ...], which keep batch and sequence shardings).
  `rope_by_flip`: `model.ops.rotate_half` swaps the halves by flipping a size-2 axis
  (else split and concatenate). `joined_qkv`: `model.ops.project_qkv` forms q, k and v
  from one product of the joined weights (from `FUSED_QKV_MIN_ROWS` tokens, heads whole).
  `fused_loss_head`: the train step runs the head and loss fused block by block.
  `row_schedule`: the chunked kernel may take its row schedule (`chunked.use_rows`), with
  blocks sized by length and window (`resolve_chunk`). `transposed_cache`: the KV cache
  holds keys [L, B, K, S, H] and values [L, B, K, H, S] (`model.cache`).
  `unrolled_decode`: the decode loop runs a shallow model's layers unrolled
  (`infer.sampler.unroll_decode`).
  """

  merged_gemms: bool
  rope_by_flip: bool
  joined_qkv: bool
  fused_loss_head: bool
  row_schedule: bool
  transposed_cache: bool
  unrolled_decode: bool


CPU_FORMS = Forms(*(True,) * len(dataclasses.fields(Forms)))
ACCELERATOR_FORMS = Forms(*(False,) * len(dataclasses.fields(Forms)))


def forms(platform: str | None = None) -> Forms:
  """The forms a step traces for `platform` (default: `target_platform()`): CPU_FORMS on
  CPU, ACCELERATOR_FORMS on TPU and GPU."""
  return CPU_FORMS if (platform or target_platform()) == "cpu" else ACCELERATOR_FORMS


def resolve(impl: str, platform: str | None = None, dtype=None) -> str:
  """`impl`, with 'auto' replaced by the backend for `platform` (default: `target_platform()`).
  On a GPU, 'auto' with a float32 `dtype` is chunked: cuDNN's flash kernels are bf16/fp16 only."""
  if impl != "auto":
    return impl
  choice = AUTO.get(platform or target_platform(), FALLBACK)
  if choice == "cudnn" and dtype is not None and jnp.dtype(dtype).name not in GPU_DTYPES:
    return FALLBACK
  return choice


ACCELERATOR_CHUNK = 512


CPU_CHUNK_MIN, CPU_BLOCKS = 64, 16
THIN_HEAD_DIM = 32  # heads this narrow or narrower: local blocks of W / 4 rows on CPU


def resolve_chunk(
  chunk: int,
  seq_len: int,
  platform: str | None = None,
  window: int | None = None,
  head_dim: int | None = None,
) -> int:
  """Block rows of the blockwise kernels: `chunk`, or for 0 ('auto') 512 on TPU and GPU,
  and on CPU (`Forms.row_schedule`) T / 16 for a global layer (`window` >= T or None),
  the larger of T / 16 and W / 2 for a local one (W / 4 for heads of at most
  `THIN_HEAD_DIM` dims), a power of two in [64, 512] ([32, 512] for those thin local
  layers).
  There the row schedule (`chunked.use_rows`) runs each query block against all its
  keys, so smaller blocks cut the causal and window waste until the products get too
  thin; these sizes were the fastest of the kernel alone (fwd + bwd) at the shapes of
  benchmarks/train_step.py. Thin heads make thin block products, so the scores'
  elementwise work weighs more and cutting waste wins, hence W / 4 for them. Not below
  64 otherwise: fewer blocks to unroll and compile for short sequences."""
  if chunk:
    return chunk
  if not forms(platform).row_schedule:
    return ACCELERATOR_CHUNK
  local = window is not None and window < seq_len
  thin = local and head_dim is not None and head_dim <= THIN_HEAD_DIM
  rows = max(1, seq_len // CPU_BLOCKS, window // (4 if thin else 2) if local else 0)
  floor = CPU_CHUNK_MIN // 2 if thin else CPU_CHUNK_MIN
  return int(min(ACCELERATOR_CHUNK, max(floor, 1 << (rows.bit_length() - 1))))


BATCH_AXES = ("data", "fsdp")  # mesh axes a kernel's rows are split over
HEAD_AXIS = "tensor"  # the mesh axis its heads are split over


def shard_specs(
  mesh,
  b: int,
  n: int,
  k: int,
  *,
  heads_together: bool = False,
  batch_axes=BATCH_AXES,
  head_axis: str = HEAD_AXIS,
):
  """(q/out, kv, segment-id) PartitionSpecs of a per-shard kernel call on `mesh` for
  [B, T, N|K, H] and [B, T] operands: B over the batch axes whose running product divides
  B; N over `head_axis` if it divides N; K too if it divides K (else K is replicated), or,
  with `heads_together` (cuDNN, whose partitioner wants q, k and v alike), heads split
  only when the axis divides both. T stays whole (context parallelism splits it)."""
  sizes = dict(mesh.shape)
  used, prod = [], 1
  for a in batch_axes:
    if sizes.get(a, 1) > 1 and b % (prod * sizes[a]) == 0:
      used.append(a)
      prod *= sizes[a]
  rows = tuple(used) if len(used) > 1 else (used[0] if used else None)
  tp = sizes.get(head_axis, 1)
  n_spec = head_axis if tp > 1 and n % tp == 0 else None
  k_spec = head_axis if n_spec and k % tp == 0 else None
  if heads_together and k_spec is None:
    n_spec = None
  P = jax.sharding.PartitionSpec
  return P(rows, None, n_spec, None), P(rows, None, k_spec, None), P(rows, None)
