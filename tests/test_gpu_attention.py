"""GPU attention ('cudnn'): packed documents reach cuDNN as O(B*M) lengths and offsets.

On CPU: the layout arithmetic against hand-derived and numpy-derived values; the
portable emulation of cuDNN's reading of the layout against `reference_attention`
(forward and gradients); the fallback for rows the layout cannot describe; the
bf16/fp16 rule; and the program built for the cuda platform (lowered without a
GPU) holds no array with two T-sized dimensions. On a GPU: cuDNN itself against
the reference in bfloat16.
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

from cwm_jax import kernels
from cwm_jax.base import ConfigError
from cwm_jax.kernels import cudnn, packing
from cwm_jax.model.config import tiny
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import abstract_model
from cwm_jax.train.step import make_train_step

ON_GPU = jax.default_backend() == "gpu"


def _qkv(b, t, n, k, h, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype) for heads in (n, k, k))


def _runs(b, t, n_docs, seed=0, pad=0):
  """Rows of `n_docs` contiguous documents (ids 1..n_docs) then `pad` padding (id 0)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t - pad), n_docs - 1, replace=False))
    ids = np.repeat(np.arange(1, n_docs + 1), np.diff(np.r_[0, cuts, t - pad]))
    rows.append(np.r_[ids, np.zeros(pad, int)])
  return jnp.asarray(np.stack(rows), jnp.int32)


def _value_and_grads(attn, q, k, v):
  proj = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * proj)
  return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, atol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=0
    )


def test_layout_of_hand_written_rows():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [5] * 8, [3, 4, 4, 4, 4, 4, 4, 9]], jnp.int32)
  layout = packing.packed_layout(seg, 4)
  np.testing.assert_array_equal(layout.seqlen_BM, [[3, 2, 3, -1], [8, -1, -1, -1], [1, 6, 1, -1]])
  np.testing.assert_array_equal(
    layout.offsets_BM1, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, 1, 7, -1, -1]]
  )
  assert np.asarray(layout.fits_B).tolist() == [True, True, True]


def test_layout_flags_rows_it_cannot_describe():
  seg = jnp.asarray([[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 1, 1], [4, 4, 4, 7, 7, 7]], jnp.int32)
  # Row 0: three runs (> M=2, fits M=3). Row 1: id 1 used by two runs. Row 2 fits.
  assert np.asarray(packing.packed_layout(seg, 3).fits_B).tolist() == [True, False, True]
  layout = packing.packed_layout(seg, 2)
  assert np.asarray(layout.fits_B).tolist() == [False, False, True]
  np.testing.assert_array_equal(layout.seqlen_BM[0], [2, 2])
  with pytest.raises(ValueError, match="max_segments=1 must be >= 2"):
    packing.packed_layout(seg, 1)


def test_layout_decodes_back_to_each_tokens_document_and_position():
  seg = np.asarray(_runs(3, 200, 7, seed=3, pad=13))
  layout = jax.jit(packing.packed_layout, static_argnums=1)(jnp.asarray(seg), 16)
  slot, local = packing.decode_layout(layout, 200)
  for row in range(3):
    starts = np.flatnonzero(np.r_[True, seg[row, 1:] != seg[row, :-1]])
    want_slot = np.searchsorted(starts, np.arange(200), side="right") - 1
    np.testing.assert_array_equal(slot[row], want_slot)
    np.testing.assert_array_equal(local[row], np.arange(200) - starts[want_slot])


@pytest.mark.parametrize("window", [1, 40, 96])
def test_portable_path_through_the_layout_matches_reference(window):
  # GQA 6/2 heads, 5 documents + padding per row, odd lengths; window 96 = global.
  q, k, v = _qkv(2, 96, 6, 2, 8)
  seg = _runs(2, 96, 5, seed=window, pad=9)
  assert bool(jnp.all(packing.packed_layout(seg, 8).fits_B))
  packed = lambda q, k, v: cudnn.cudnn_attention(
    q, k, v, seg, window=window, chunk=16, max_segments=8, implementation="xla"
  )
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="reference")
  got = jax.jit(lambda *a: _value_and_grads(packed, *a))(q, k, v)
  want = jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v)
  _assert_close(got, want, atol=2e-6)


def test_rows_beyond_the_layout_fall_back_and_still_match_reference():
  q, k, v = _qkv(2, 64, 4, 2, 8, seed=5)
  many = np.asarray(_runs(1, 64, 9, seed=1))[0]  # 9 documents > M=4
  reused = np.r_[[1] * 20, [2] * 20, [1] * 24]  # id 1 in two runs
  seg = jnp.asarray(np.stack([many, reused]), jnp.int32)
  assert not np.asarray(packing.packed_layout(seg, 4).fits_B).any()
  packed = lambda q, k, v: cudnn.cudnn_attention(
    q, k, v, seg, window=24, chunk=16, max_segments=4, implementation="xla"
  )
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=24, impl="reference")
  _assert_close(
    jax.jit(lambda *a: _value_and_grads(packed, *a))(q, k, v),
    jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v),
    atol=2e-6,
  )


def test_only_bf16_and_fp16_pass_the_gpu_dtype_rule(monkeypatch):
  for ok in ("bfloat16", "float16", jnp.bfloat16):
    cudnn.check_gpu_dtypes(ok)
  for bad in ("float32", jnp.float32, "int8", "no_such_dtype"):
    with pytest.raises(ConfigError, match="compute_dtype='bfloat16'"):
      cudnn.check_gpu_dtypes(bad)
  monkeypatch.setattr(cudnn, "require_gpu", lambda: None)
  q, k, v = _qkv(1, 16, 2, 1, 8)
  seg = jnp.ones((1, 16), jnp.int32)
  with pytest.raises(ConfigError, match="float32"):
    kernels.attend(q, k, v, seg, window=4, impl="cudnn")
  with pytest.raises(ConfigError, match="float32"):
    kernels.attend(q.astype(jnp.bfloat16), k, v, seg, window=4, impl="cudnn")


def _cuda_lowering(monkeypatch, f, *args):
  """StableHLO text of `f` lowered for the cuda platform on a machine without a GPU.

  JAX asks for the cuDNN version (the CUDA plugin is not installed here, so the
  test answers 9.10) and the compute capability (`cudnn.compiling_for` answers
  for a Hopper target) while tracing.
  """
  monkeypatch.setattr(cudnn, "require_gpu", lambda: None)
  monkeypatch.setattr(cudnn_fmha, "check_cudnn_version", lambda: 91000)
  with cudnn.compiling_for("9.0"):
    traced = jax.jit(f).trace(*args)
  return traced.jaxpr, traced.lower(lowering_platforms=("cuda",)).as_text()


def _jaxpr_shapes(jaxpr):
  """Shapes of every value in a closed jaxpr, sub-jaxprs (cond, scan, vjp) included."""
  shapes = []
  for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
    shapes += [tuple(getattr(x.aval, "shape", ())) for x in (*eqn.invars, *eqn.outvars)]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _jaxpr_shapes(sub)
  return shapes


def _square_arrays(shapes, t):
  return sorted({s for s in shapes if sum(d >= t for d in s) >= 2})


def _module_shapes(text):
  return [
    tuple(int(d) for d in m.split("x")[:-1])
    for m in re.findall(r"tensor<((?:\d+x)+)[a-z]\w*>", text)
  ]


def test_gpu_step_lowered_for_cuda_holds_no_t_by_t_array(monkeypatch):
  # T=384, 4 documents, local window 100 and global: forward + gradients as in training.
  b, t = 2, 384
  q, k, v = _qkv(b, t, 4, 2, 64, dtype=jnp.bfloat16)
  seg = _runs(b, t, 4, seed=2, pad=20)

  def step(q, k, v, seg, impl):
    def loss(q, k, v):
      outs = [kernels.attend(q, k, v, seg, window=w, impl=impl, chunk=64) for w in (100, t)]
      return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in outs)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  jaxpr, text = _cuda_lowering(monkeypatch, lambda *a: step(*a, "cudnn"), q, k, v, seg)
  assert text.count("__cudnn$fmhaSoftmax(") == 2 and text.count("__cudnn$fmhaSoftmaxBackward(") == 2
  assert "\\22sliding_window_length\\22: 100" in text and "\\22max_seg_per_batch\\22: 64" in text
  assert _square_arrays(_jaxpr_shapes(jaxpr), t) == []
  assert _square_arrays(_module_shapes(text), t) == []
  # The checks can fail: the dense reference holds [B, T, T] masks and [B, K, G, T, T] scores.
  ref_jaxpr, ref_text = _cuda_lowering(monkeypatch, lambda *a: step(*a, "reference"), q, k, v, seg)
  assert (b, t, t) in _square_arrays(_jaxpr_shapes(ref_jaxpr), t)
  assert (b, 2, 2, t, t) in _square_arrays(_module_shapes(ref_text), t)


@pytest.mark.skipif(
  not ON_GPU,
  reason="cuDNN attention needs an NVIDIA GPU (backend is "
  f"{jax.default_backend()!r}); benchmarks/gpu_check.sh runs this on one",
)
@pytest.mark.parametrize("window", [64, 1024])
def test_cudnn_matches_reference_on_gpu_bf16(window):
  q, k, v = _qkv(2, 1024, 8, 2, 128, dtype=jnp.bfloat16)
  seg = _runs(2, 1024, 6, seed=window, pad=40)
  got = jax.jit(
    lambda *a: _value_and_grads(
      lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="cudnn"), *a
    )
  )(q, k, v)
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="reference")
  want = jax.jit(lambda *a: _value_and_grads(ref, *a))(*(x.astype(jnp.float32) for x in (q, k, v)))
  _assert_close(got[0], want[0], atol=2e-2)
  for g, w in zip(got[1], want[1]):
    scale = float(jnp.max(jnp.abs(w)))
    _assert_close(g.astype(jnp.float32) / scale, w / scale, atol=2e-2)


def test_train_step_built_for_cuda_holds_no_t_by_t_array(monkeypatch):
  # A whole bf16 train step (tiny CWM: global, local, local, global) lowered for cuda.
  b, t = 2, 768  # T above every other dimension (vocab 512)
  cfg = tiny(local_window=64)
  run = Execution(compute_dtype="bfloat16", attention_impl="cudnn", attention_chunk=128)
  tx = optax.adamw(1e-3)
  params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(abstract_model(cfg, run), nnx.Param)))
  state = {
    "params": params,
    "opt_state": jax.eval_shape(tx.init, params),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  batch = {
    k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "weights" else jnp.int32)
    for k in ("inputs", "targets", "positions", "segment_ids", "weights")
  }
  step = make_train_step(cfg, tx, lambda s: 1e-3, execution=run)
  jaxpr, text = _cuda_lowering(monkeypatch, step, state, batch)
  assert text.count("__cudnn$fmhaSoftmaxBackward(") >= 2  # local and global kernels
  assert _square_arrays(_jaxpr_shapes(jaxpr), t) == []
  assert _square_arrays(_module_shapes(text), t) == []


def test_sharded_rows_and_heads_match_reference():
  # 8 simulated devices: rows over data x fsdp, heads over tensor; one shard's rows need the
  # fallback (too many documents), the others take the layout path.
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  q, k, v = _qkv(4, 64, 4, 2, 8, seed=7)
  seg = jnp.concatenate([_runs(3, 64, 3, seed=4), _runs(1, 64, 12, seed=5)])
  packed = lambda q, k, v: cudnn.cudnn_attention(
    q, k, v, seg, window=20, chunk=16, max_segments=4, implementation="xla"
  )
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=20, impl="reference")
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: _value_and_grads(packed, *a))(q, k, v)
    text = jax.jit(packed).lower(q, k, v).as_text()
  assert "sdy.manual_computation" in text  # per-shard call
  _assert_close(got, jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v), atol=2e-6)
  assert cudnn.shard_specs(mesh, 4, 4, 2)[0] == jax.sharding.PartitionSpec(
    ("data", "fsdp"), None, "tensor", None
  )
  assert cudnn.shard_specs(mesh, 2, 4, 3)[1] == jax.sharding.PartitionSpec("data", None, None, None)


def test_gpus_cudnn_cannot_serve_are_a_clear_error(monkeypatch):
  # An A100 (8.0) has no packed layout in cuDNN: a ConfigError naming the fix, at trace time.
  monkeypatch.setattr(cudnn, "require_gpu", lambda: None)
  monkeypatch.setattr(cudnn_fmha, "check_cudnn_version", lambda: 91000)
  q, k, v = _qkv(1, 256, 4, 2, 64, dtype=jnp.bfloat16)
  seg = _runs(1, 256, 3)
  with cudnn.compiling_for("8.0"), pytest.raises(ConfigError, match="Hopper.*'chunked'"):
    jax.jit(lambda q, k, v: kernels.attend(q, k, v, seg, window=64, impl="cudnn")).trace(q, k, v)


def test_element_offsets_cudnn_receives_match_the_keys_it_receives(monkeypatch):
  # JAX turns token offsets into element offsets (`_fix_seqlen_offsets`); under GQA the
  # pinned JAX uses the query's stride for the keys, so the kernel must hand cuDNN keys
  # whose per-token stride is that one. Checked on what cuDNN would really get.
  seen = {}

  def record(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, **kw):
    seen.update(q=q, k=k, seqlen=kv_seqlen, offsets=kv_offsets)
    return jnp.zeros_like(q)

  monkeypatch.setattr(cudnn_fmha, "dot_product_attention", record)
  b, t, n, kv, h = 2, 64, 6, 2, 8
  q, k, v = _qkv(b, t, n, kv, h, dtype=jnp.bfloat16)
  seg = _runs(b, t, 3, seed=9)
  layout = packing.packed_layout(seg, 4)
  cudnn.packed_cudnn_attention(q, k, v, layout.seqlen_BM, layout.offsets_BM1, window=16)
  _, _, _, kv_elems = cudnn_fmha._fix_seqlen_offsets(
    seen["seqlen"], seen["seqlen"], seen["offsets"], seen["offsets"], seen["q"], seen["k"]
  )
  starts = [
    np.flatnonzero(np.r_[True, row[1:] != row[:-1]]) + i * t
    for i, row in enumerate(np.asarray(seg))
  ]
  stride = seen["k"].shape[2] * h  # elements per token of the keys cuDNN is given
  np.testing.assert_array_equal(
    np.asarray(kv_elems).reshape(-1)[:6], np.concatenate(starts) * stride
  )
  # The repeated keys keep the reference's grouping: query head i reads kv head i // 3.
  np.testing.assert_array_equal(seen["k"][:, :, 4], k[:, :, 1])


def test_execution_config_checks_the_gpu_dtype_and_auto_avoids_cudnn_in_float32():
  from cwm_jax.kernels import backend
  from cwm_jax.model.execution import Execution

  with pytest.raises(ConfigError, match="needs compute_dtype in"):
    Execution(attention_impl="cudnn")  # float32 compute
  with pytest.raises(ConfigError, match="needs compute_dtype in"):
    Execution(attention_impl="chunked", global_attention_impl="cudnn")
  assert Execution(attention_impl="cudnn", compute_dtype="bfloat16").attention_impl == "cudnn"
  assert backend.resolve("auto", "gpu", "float32") == "chunked"
  assert backend.resolve("auto", "gpu", "bfloat16") == "cudnn"
  assert backend.resolve("auto", "tpu", "float32") == "splash"


def test_execution_max_segments_reaches_cudnn(monkeypatch):
  from cwm_jax.model.attention import attention_kernel
  from cwm_jax.model.execution import Execution

  seen = []
  monkeypatch.setattr(
    kernels, "cudnn_attention", lambda q, *a, **kw: seen.append(kw.get("max_segments")) or q
  )
  q, k, v = _qkv(1, 16, 4, 2, 8, dtype=jnp.bfloat16)
  seg = jnp.ones((1, 16), jnp.int32)
  for m in (0, 16):
    run = Execution(compute_dtype="bfloat16", attention_impl="cudnn", attention_max_segments=m)
    attention_kernel(tiny(), run, window=8)(q, k, v, seg)
  assert seen == [None, 16]  # 0: cudnn_attention's own default, min(64, T)
  with pytest.raises(ConfigError, match="attention_max_segments=1 must be >= 2"):
    Execution(attention_max_segments=1)
