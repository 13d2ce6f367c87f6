"""GPU flash attention over packed documents: cuDNN's ragged (THD) layout, no T x T mask.

Packed rows go to cuDNN as per-document lengths and offsets (`packing.py`,
O(B*M) int32 side inputs, M = `max_segments` documents per row) through the
pinned JAX's `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`:
mask type PADDING_CAUSAL, `sliding_window_length=W` (cuDNN keeps keys in
`(q - W, q]`, the query included, as `masks.allowed`). GQA: cuDNN takes K < N
kv heads, but the pinned JAX scales packed kv offsets by the query's stride, so
K/V are repeated to N heads while that bug lasts (`kv_offsets_use_query_stride`).
The public `jax.nn.dot_product_attention` takes only one length per row, so
packed documents there need a dense [B, 1, T, S] mask (O(T^2) memory).

cuDNN keeps a float32 softmax statistic of shape [B*M, N, T] for the backward
pass, so M trades memory against how many documents a row may hold. A row with
more than M documents, or a segment id used by two separate runs, cannot be
described by the layout: then the whole batch runs `chunked_attention` (pure-JAX
flash attention reading segment ids, O(T) memory) under `lax.cond`, so results
always equal `reference_attention`; only speed depends on M.

Under a mesh of more than one device the call runs per shard in `jax.shard_map`
(rows over `data`/`fsdp`, heads over `tensor`; `shard_specs`), so each shard
builds its own layout and picks its own path.

cuDNN flash attention needs bfloat16 or float16 inputs: `check_gpu_dtypes`
validates a configured compute dtype (`ConfigError`) and the kernel checks the
arrays it gets. `implementation='xla'` runs the same layout through a dense,
portable emulation of cuDNN's reading of it (tests, CPU); it accepts float32.

Legend: B batch, T length, N query heads, K kv heads, H head dim, M max
documents per row.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

from cwm_jax.base import ConfigError
from cwm_jax.kernels import backend, packing
from cwm_jax.kernels.chunked import chunked_attention
from cwm_jax.kernels.masks import allowed
from cwm_jax.kernels.reference import gqa_combine, gqa_scores, masked_softmax

GPU_DTYPES = backend.GPU_DTYPES
DEFAULT_MAX_SEGMENTS = 64
IMPLEMENTATIONS = ("cudnn", "xla")


def check_gpu_dtypes(compute_dtype) -> None:
  """ConfigError unless `compute_dtype` is one cuDNN flash attention accepts."""
  try:
    name = jnp.dtype(compute_dtype).name
  except TypeError:
    name = str(compute_dtype)
  if name not in GPU_DTYPES:
    raise ConfigError(
      f"attention_impl='cudnn' needs compute_dtype in {GPU_DTYPES} (cuDNN flash "
      f"attention has no float32 kernel); got {name!r}. Set compute_dtype='bfloat16', "
      "or use attention_impl='chunked' for float32."
    )


def default_max_segments(t: int) -> int:
  """Documents per row the fast path holds: 64, or T if shorter (never below 2)."""
  return max(2, min(DEFAULT_MAX_SEGMENTS, t))


def require_gpu() -> None:
  """RuntimeError unless JAX runs on a GPU or has the CUDA plugin (ahead-of-time
  compilation for GPU targets from a CPU host)."""
  if jax.default_backend() != "gpu" and cudnn_fmha.cuda_versions is None:
    raise RuntimeError(
      "attention_impl='cudnn' needs an NVIDIA GPU (backend is "
      f"{jax.default_backend()!r}); use 'chunked' on CPU/TPU"
    )


@contextlib.contextmanager
def compiling_for(capability: str = "9.0"):
  """Trace for a GPU target of this CUDA compute capability from a host without one.

  JAX's cuDNN attention asks the local backend for the compute capability while
  tracing (the packed layout needs Hopper, 9.0); ahead-of-time compilation for
  compile-only GPU devices answers for the target instead. Not thread-safe.
  """
  target = tuple(int(x) for x in capability.split("."))
  answers = {
    "check_compute_capability": lambda c: target >= tuple(int(x) for x in c.split(".")),
    "is_cuda_compute_capability_equal": lambda c: target == tuple(int(x) for x in c.split(".")),
  }
  saved = {name: getattr(cudnn_fmha, name) for name in answers}
  try:
    for name, fn in answers.items():
      setattr(cudnn_fmha, name, fn)
    yield
  finally:
    for name, fn in saved.items():
      setattr(cudnn_fmha, name, fn)


def cudnn_attention(
  q_BTNH,
  k_BTKH,
  v_BTKH,
  segment_ids_BT,
  *,
  window: int,
  chunk: int = 512,
  max_segments: int | None = None,
  implementation: str = "cudnn",
):
  """Self-attention over packed rows; matches `reference_attention`.

  Args:
    q_BTNH, k_BTKH, v_BTKH: queries, keys, values (bf16/fp16 for 'cudnn').
    segment_ids_BT: document id per token; documents are contiguous runs.
    window: keys a query may see, itself included (`q - k < window`).
    chunk: block rows of the `chunked_attention` fallback.
    max_segments: static cap M on documents per row (default
      `default_max_segments(T)`); rows beyond it take the fallback.
    implementation: 'cudnn' (GPU) or 'xla' (dense portable emulation).
  Returns:
    [B, T, N, H] attention output in the dtype of `q_BTNH`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; use one of {IMPLEMENTATIONS}")
  if implementation == "cudnn":
    require_gpu()
    _check_arrays(q_BTNH, k_BTKH, v_BTKH)
  t = q_BTNH.shape[1]
  m = default_max_segments(t) if max_segments is None else max_segments
  packed = packed_cudnn_attention if implementation == "cudnn" else packed_xla_attention

  def attend(q, k, v, seg):
    layout = packing.packed_layout(seg, m)

    def fast(q, k, v, seg):
      del seg
      return packed(q, k, v, layout.seqlen_BM, layout.offsets_BM1, window=window)

    def fallback(q, k, v, seg):
      return chunked_attention(q, k, v, seg, window=window, chunk=chunk).astype(q.dtype)

    return jax.lax.cond(jnp.all(layout.fits_B), fast, fallback, q, k, v, seg)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  q_spec, kv_spec, seg_spec = shard_specs(mesh, *q_BTNH.shape[:1], q_BTNH.shape[2], k_BTKH.shape[2])
  return jax.shard_map(
    attend,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def shard_specs(mesh, b: int, n: int, k: int):
  """`backend.shard_specs` with heads split only when `tensor` divides both N and K."""
  return backend.shard_specs(mesh, b, n, k, heads_together=True)


def _check_arrays(q_BTNH, k_BTKH, v_BTKH):
  dtypes = {jnp.dtype(x.dtype).name for x in (q_BTNH, k_BTKH, v_BTKH)}
  if len(dtypes) != 1 or not dtypes <= set(GPU_DTYPES):
    raise ConfigError(
      f"cuDNN attention got q/k/v dtypes {sorted(dtypes)}; it needs one of {GPU_DTYPES} "
      "for all three. Run the model with compute_dtype='bfloat16', or use "
      "attention_impl='chunked' for float32."
    )


@functools.cache
def kv_offsets_use_query_stride() -> bool:
  """Whether JAX turns kv token offsets into element offsets with the query's stride.

  jax 0.10.2's `_fix_seqlen_offsets` multiplies kv offsets by N*H, the query's
  per-token stride, which is right only when K == N: under GQA cuDNN would read
  keys of the wrong tokens, silently (fixed upstream in jax-ml/jax#39521). While
  it does, `packed_cudnn_attention` repeats K/V to N heads (memory: two more
  [B, T, N, H] arrays per call). True when the source cannot be read.
  """
  try:
    source = inspect.getsource(cudnn_fmha._fix_seqlen_offsets)  # pylint: disable=protected-access
  except (OSError, TypeError, AttributeError):
    return True
  return "kv_offsets = kv_offsets * N * H" in source


def packed_cudnn_attention(q_BTNH, k_BTKH, v_BTKH, seqlen_BM, offsets_BM1, *, window: int):
  """cuDNN flash attention over the documents `seqlen_BM`/`offsets_BM1` describe."""
  t, n, h = q_BTNH.shape[1:]
  if k_BTKH.shape[2] != n and kv_offsets_use_query_stride():
    g = n // k_BTKH.shape[2]  # query head i reads kv head i // g, as in the reference
    k_BTKH, v_BTKH = jnp.repeat(k_BTKH, g, axis=2), jnp.repeat(v_BTKH, g, axis=2)
  try:
    return cudnn_fmha.dot_product_attention(
      q_BTNH,
      k_BTKH,
      v_BTKH,
      None,
      None,
      seqlen_BM,
      seqlen_BM,
      offsets_BM1,
      offsets_BM1,
      scale=h**-0.5,
      mask_type=cudnn_fmha.MaskType.PADDING_CAUSAL,
      sliding_window_length=window if window < t else None,
    )
  except NotImplementedError as e:  # pre-Hopper GPU, head dim > 256 or not a multiple of 8
    raise ConfigError(
      f"cuDNN flash attention cannot run this case: {e} (packed documents need "
      "a Hopper or newer GPU, head_dim a multiple of 8 up to 256); use "
      "attention_impl='chunked'"
    ) from e


def packed_xla_attention(q_BTNH, k_BTKH, v_BTKH, seqlen_BM, offsets_BM1, *, window: int):
  """What `packed_cudnn_attention` computes, as a dense portable program.

  Reads only the layout (never segment ids): a token sees keys of its own run,
  at or before it in the run, inside the window. Rows no run covers see nothing.
  """
  t = q_BTNH.shape[1]
  slot_BT, local_BT = packing.decode_layout(packing.PackedLayout(seqlen_BM, offsets_BM1, None), t)
  mask_BTS = (
    allowed(
      local_BT[:, :, None], local_BT[:, None, :], slot_BT[:, :, None], slot_BT[:, None, :], window
    )
    & (slot_BT >= 0)[:, :, None]
  )
  probs = masked_softmax(gqa_scores(q_BTNH, k_BTKH), mask_BTS[:, None, None])
  return gqa_combine(probs, v_BTKH)
