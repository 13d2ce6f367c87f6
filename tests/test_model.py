"""Model invariants and parity with transformers' CwmForCausalLM."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cwm_jax.base import ConfigError
from cwm_jax.checkpoint.hf import config_to_hf
from cwm_jax.checkpoint.load import load_params
from cwm_jax.kernels import backend
from cwm_jax.kernels.backend import ACCELERATOR_FORMS, CPU_FORMS
from cwm_jax.model import (
  Execution,
  ModelConfig,
  init_model,
  meta_layer_windows,
  model_from_params,
  ops,
  rope,
  tiny,
)

FORMS = {"cpu": CPU_FORMS, "accelerator": ACCELERATOR_FORMS}

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROPE = dict(
  rope_theta=1e6,
  factor=4.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=32,
  rope_type="llama3",
)
HF_CASES = {
  # default transformers pattern (i % 4 == 0 global), T > window, GQA 2
  "default_pattern": dict(
    num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8
  ),
  # Meta's pattern with the last layer global, GQA 4
  "last_layer_global": dict(
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=12,
    layer_types=[
      "full_attention" if i % 4 == 0 or i == 5 else "sliding_attention" for i in range(6)
    ],
  ),
  # an arbitrary custom pattern, no RoPE scaling, MHA
  "custom_types": dict(
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    sliding_window=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    rope_parameters=dict(rope_theta=10000.0, rope_type="default"),
  ),
}


def _forward(model, *args):
  return np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *map(jnp.asarray, args)))


def _hf_checkpoint(tmp_path, name, **kw):
  torch.manual_seed(sum(map(ord, name)))
  fields = dict(
    vocab_size=301,
    hidden_size=64,
    intermediate_size=96,
    max_position_embeddings=256,
    rope_parameters=ROPE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  fields.update(kw)
  model = transformers.CwmForCausalLM(transformers.CwmConfig(**fields)).eval()
  path = tmp_path / name
  model.save_pretrained(path)
  return model, str(path)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_parity_with_transformers(tmp_path, case):
  ref_model, path = _hf_checkpoint(tmp_path, case, **HF_CASES[case])
  ids = torch.randint(0, 301, (2, 37), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref = ref_model(ids).logits.double()
  ref_lp = torch.log_softmax(ref, -1).numpy()
  cfg, params = load_params(path)
  assert [w < cfg.global_window for w in cfg.layer_windows] == [
    t == "sliding_attention" for t in ref_model.config.layer_types
  ]
  for impl in ("reference", "chunked"):
    model = model_from_params(cfg, params, Execution(attention_impl=impl, attention_chunk=8))
    logits = _forward(model, ids.numpy()).astype(np.float64)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=0)
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(lp, ref_lp, atol=1e-4, rtol=0)


def test_parity_with_transformers_when_qkv_are_joined(tmp_path):
  """From `ops.FUSED_QKV_MIN_ROWS` tokens on CPU, q, k and v come from one product
  (`ops.joined_qkv`); the parity cases above run below it, this one above."""
  ref_model, path = _hf_checkpoint(tmp_path, "joined", **HF_CASES["last_layer_global"])
  t = ops.FUSED_QKV_MIN_ROWS // 2 + 3
  ids = torch.randint(0, 301, (2, t), generator=torch.Generator().manual_seed(1))
  assert ops.joins_qkv(jnp.zeros((2, t, 64)))
  assert not ops.joins_qkv(jnp.zeros((2, 37, 64)))
  assert not ops.joins_qkv(jnp.zeros((2, t, 64)), ACCELERATOR_FORMS)
  for tensor, joined in ((2, False), (1, True)):  # not with heads split over the mesh
    mesh = jax.sharding.AbstractMesh((tensor, 2), ("tensor", "fsdp"))
    with jax.sharding.use_abstract_mesh(mesh):
      assert ops.joins_qkv(jnp.zeros((2, t, 64))) == joined
  with torch.no_grad():
    ref = ref_model(ids).logits.double().numpy()
  cfg, params = load_params(path)
  model = model_from_params(cfg, params, Execution(attention_impl="chunked", attention_chunk=16))
  np.testing.assert_allclose(
    _forward(model, ids.numpy()).astype(np.float64), ref, atol=1e-4, rtol=0
  )


def test_parity_with_transformers_in_the_accelerator_forms(tmp_path, monkeypatch):
  """The forms the model traces for a TPU or GPU (`backend.ACCELERATOR_FORMS`: unmerged
  contractions, split/concatenate RoPE, three q/k/v products, the chunked kernel's pair
  scan), run on CPU, match transformers too, above `ops.FUSED_QKV_MIN_ROWS` tokens
  (where the CPU forms join q/k/v)."""
  monkeypatch.setattr(backend, "forms", lambda platform=None: ACCELERATOR_FORMS)
  ref_model, path = _hf_checkpoint(tmp_path, "accel", **HF_CASES["default_pattern"])
  t = ops.FUSED_QKV_MIN_ROWS // 2 + 5
  ids = torch.randint(0, 301, (2, t), generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref = ref_model(ids).logits.double().numpy()
  cfg, params = load_params(path)
  for impl in ("reference", "chunked"):
    model = model_from_params(cfg, params, Execution(attention_impl=impl, attention_chunk=16))
    np.testing.assert_allclose(
      _forward(model, ids.numpy()).astype(np.float64), ref, atol=1e-4, rtol=0
    )


def test_cpu_and_accelerator_forms_give_the_same_loss_and_gradients(monkeypatch):
  """The whole model, forward and backward, in each platform's forms on CPU: the same
  loss and parameter gradients (the CPU forms join q/k/v here: T * B >= 256 tokens)."""
  cfg = tiny(local_window=24)
  b, t = 2, 160
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  execution = Execution(attention_impl="chunked", attention_chunk=32, scan_layers=False)
  graphdef, params = nnx.split(init_model(cfg, seed=3, execution=execution), nnx.Param)

  def loss_and_grads(forms):
    monkeypatch.setattr(backend, "forms", lambda platform=None: forms)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens))[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)  # a fresh trace in each form

  assert ops.joins_qkv(jnp.zeros((b, t, cfg.dim)), CPU_FORMS)
  cpu, accelerator = loss_and_grads(CPU_FORMS), loss_and_grads(ACCELERATOR_FORMS)
  for got, want in zip(jax.tree.leaves(accelerator), jax.tree.leaves(cpu)):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)


def test_score_cli_matches_transformers(tmp_path):
  ref_model, path = _hf_checkpoint(tmp_path, "score", **HF_CASES["default_pattern"])
  ids = [5, 17, 9, 200, 3, 3, 42, 7, 100, 11, 12, 250]
  out = tmp_path / "lp.npy"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.score",
      f"--checkpoint={path}",
      f"--token_ids={','.join(map(str, ids))}",
      f"--output={out}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  with torch.no_grad():
    ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits.double(), -1)[0]
  expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
  got = np.load(out)
  assert got.dtype == np.float32 and got.shape == (len(ids) - 1,)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.score",
      f"--checkpoint={path}",
      "--token_ids=5,99999",
      f"--output={out}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert bad.returncode == 2 and "outside the vocabulary" in bad.stderr


def test_hf_config_roundtrip_keeps_layer_pattern():
  cfg = tiny(n_layers=6)
  hf = config_to_hf(cfg)
  assert hf["layer_types"][-1] == "full_attention"  # Meta's last-layer-global rule
  from cwm_jax.checkpoint.hf import config_from_hf

  assert config_from_hf(hf) == cfg


def _packed_inputs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, 512, n) for n in lengths]
  tokens = np.concatenate(docs)[None]
  segs = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  pos = np.concatenate([np.arange(n) for n in lengths])[None]
  return docs, tokens, segs, pos


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_packed_documents_equal_separate_runs(impl):
  model = init_model(tiny(), seed=1, execution=Execution(attention_impl=impl, attention_chunk=8))
  docs, tokens, segs, pos = _packed_inputs([7, 23, 13])
  packed = _forward(model, tokens, pos, segs)[0]
  start = 0
  for doc in docs:
    alone = _forward(model, doc[None])[0]
    np.testing.assert_allclose(packed[start : start + len(doc)], alone, atol=1e-5)
    start += len(doc)


def test_causality():
  model = init_model(tiny(), seed=2)
  tokens = np.random.default_rng(0).integers(0, 512, (1, 30))
  base = _forward(model, tokens)
  for t in (0, 11, 29):
    changed = tokens.copy()
    changed[0, t] = (changed[0, t] + 1) % 512
    out = _forward(model, changed)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-6


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_and_grads(cfg, run, params, tokens, segs, pos):
  def loss(p):
    logits = model_from_params(cfg, p, run)(tokens, pos, segs)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  return jax.value_and_grad(loss)(params)


def test_execution_variants_agree():
  """scan == unrolled, remat == no remat, chunked == reference (loss and grads)."""
  base_cfg = tiny(local_window=6)  # T=29 is not a multiple of the chunk (8)
  params = nnx.to_pure_dict(nnx.state(init_model(base_cfg, seed=3), nnx.Param))
  _, tokens, segs, pos = _packed_inputs([9, 17, 3])
  tokens, segs, pos = map(jnp.asarray, (tokens, segs, pos))
  ref_loss, ref_grads = _loss_and_grads(
    base_cfg, Execution(scan_layers=False), params, tokens, segs, pos
  )
  variants = [
    dict(remat_policy="full"),
    dict(attention_impl="chunked", remat_policy="attention"),
    dict(attention_impl="chunked", scan_layers=False, remat_policy="dots"),
  ]
  for v in variants:
    run = Execution(attention_chunk=8, **v)
    loss, grads = _loss_and_grads(base_cfg, run, params, tokens, segs, pos)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-6, err_msg=str(v))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, atol=1e-5, err_msg=str(v))


def test_jit_equals_eager():
  model = init_model(tiny(), seed=4, execution=Execution(scan_layers=False))
  _, tokens, segs, pos = _packed_inputs([5, 8])
  eager = np.asarray(model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(segs)))
  np.testing.assert_allclose(_forward(model, tokens, pos, segs), eager, atol=1e-6)


def test_bfloat16_policy():
  full = init_model(tiny(), seed=0)
  model = model_from_params(
    tiny(),
    nnx.to_pure_dict(nnx.state(full, nnx.Param)),
    Execution(param_dtype="bfloat16", compute_dtype="bfloat16"),
  )
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  logits, h = nnx.jit(lambda m, t: (m(t), m.hidden(t)))(model, tokens)
  assert logits.dtype == jnp.float32 and h.dtype == jnp.bfloat16
  np.testing.assert_allclose(logits, _forward(full, tokens), atol=0.05)


@pytest.mark.parametrize("forms", sorted(FORMS))
def test_float32_logits_backward_runs_in_the_compute_dtype(forms):
  """bf16 activations, float32 logits: the head's gradient matmuls take bf16 operands
  (JAX's own transpose would feed them the float32 cotangent, i.e. a float32 matmul),
  and equal the hand-derived gradients: cotangent cast to bf16, float32 accumulation."""
  forms = FORMS[forms]
  dense = functools.partial(ops.dense, forms=forms)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
  proj = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  loss = lambda x, w: jnp.sum(dense(x, w, preferred_element_type=jnp.float32) * proj)
  assert dense(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32
  grad = jax.grad(loss, (0, 1))
  dots = [e for e in jax.make_jaxpr(grad)(x, w).jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  dx, dw = grad(x, w)
  g = proj.astype(jnp.bfloat16)
  want_dx = np.einsum("btv,dv->btd", np.float32(g), np.float32(w.astype(jnp.bfloat16)))
  want_dw = np.einsum("btd,btv->dv", np.float32(x), np.float32(g))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(np.float32(dx), want_dx, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dw, np.float32(jnp.asarray(want_dw, jnp.bfloat16)), rtol=1e-6)
  # float32 activations keep JAX's own (exact) gradient
  x32 = x.astype(jnp.float32)
  want = jax.grad(lambda x, w: jnp.sum(jnp.tensordot(x, w, 1) * proj), (0, 1))(x32, w)
  for got, ref in zip(grad(x32, w), want):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "form,products",
  [("joined", 1), ("joined_unmerged", 1), ("separate", 3), ("separate_merged", 3)],
)
def test_qkv_projection_matches_hand_derived_values_and_gradients(form, products):
  """Both forms of the q/k/v projection against numpy: CPU's one product of the joined
  weights (`ops.joined_qkv`) and the accelerators' three (`ops.project_qkv` below
  `FUSED_QKV_MIN_ROWS` tokens or in ACCELERATOR_FORMS), each over either form of
  `dense`: the projections, the gradients of x and of each weight (hand-derived), and
  the forward's count of products."""
  forms = ACCELERATOR_FORMS if form in ("joined_unmerged", "separate") else CPU_FORMS
  project = ops.joined_qkv if form.startswith("joined") else ops.project_qkv
  qkv = lambda x, *ws: project(x, *ws, forms=forms)
  rng = np.random.default_rng(0)
  b, t, d, n, k, h = 2, 5, 12, 4, 2, 3
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  ws = [rng.normal(size=s).astype(np.float32) for s in ((d, n, h), (d, k, h), (d, k, h))]
  cots = [rng.normal(size=(b, t, m, h)).astype(np.float32) for m in (n, k, k)]
  outs = qkv(jnp.asarray(x), *map(jnp.asarray, ws))
  for out, w in zip(outs, ws):
    np.testing.assert_allclose(out, np.einsum("btd,dmh->btmh", x, w), rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(qkv)(x, *ws).jaxpr
  assert sum(e.primitive.name == "dot_general" for e in jaxpr.eqns) == products
  loss = lambda x, *ws: sum(jnp.sum(o * c) for o, c in zip(qkv(x, *ws), cots))
  dx, *dws = jax.grad(loss, argnums=(0, 1, 2, 3))(x, *ws)
  want_dx = sum(np.einsum("btmh,dmh->btd", c, w) for c, w in zip(cots, ws))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  for dw, c in zip(dws, cots):
    np.testing.assert_allclose(dw, np.einsum("btd,btmh->dmh", x, c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forms", sorted(FORMS))
@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_forms_match_numpy(forms, n_in):
  """`ops.dense` in either form (one 2-D GEMM over merged token dims, or the contraction
  over [B, T, ...]) against numpy: values and the gradients of x and w."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  w = rng.normal(size=(4, 5, 6) if n_in == 2 else (5, 6, 7)).astype(np.float32)
  spec = "btij,ijo->bto" if n_in == 2 else "btij,jop->btiop"
  want = np.einsum(spec, x, w)
  cot = rng.normal(size=want.shape).astype(np.float32)
  dense = lambda x, w: ops.dense(x, w, n_in, forms=FORMS[forms])
  np.testing.assert_allclose(dense(x, w), want, rtol=1e-5, atol=1e-5)
  dx, dw = jax.grad(lambda x, w: jnp.sum(dense(x, w) * cot), (0, 1))(x, w)
  ins, outs = spec.split("->")[0].split(","), spec.split("->")[1]
  np.testing.assert_allclose(dx, np.einsum(f"{outs},{ins[1]}->{ins[0]}", cot, w), atol=1e-4)
  np.testing.assert_allclose(dw, np.einsum(f"{ins[0]},{outs}->{ins[1]}", x, cot), atol=1e-4)


@pytest.mark.parametrize("forms", sorted(FORMS))
def test_swiglu_forms_match_numpy(forms):
  """`ops.swiglu` in either form (one [B*T, .] view, or [B, T, F] hidden activations)
  against numpy: w2(silu(w1 x) * w3 x), and the gradients of x and the three weights."""
  rng = np.random.default_rng(5)
  b, t, d, f = 2, 3, 8, 12
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  w1, w3 = (rng.normal(size=(d, f)).astype(np.float32) for _ in range(2))
  w2 = rng.normal(size=(f, d)).astype(np.float32)
  cot = rng.normal(size=(b, t, d)).astype(np.float32)
  gate, up = x @ w1, x @ w3
  sig = 1 / (1 + np.exp(-gate))
  h = gate * sig * up
  swiglu = lambda *a: ops.swiglu(*a, forms=FORMS[forms])
  np.testing.assert_allclose(swiglu(x, w1, w3, w2), h @ w2, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda *a: jnp.sum(swiglu(*a) * cot), (0, 1, 2, 3))(x, w1, w3, w2)
  dh = cot @ w2.T
  dgate = dh * up * (sig + gate * sig * (1 - sig))
  dup = dh * gate * sig
  want = (
    dgate @ w1.T + dup @ w3.T,
    np.einsum("btd,btf->df", x, dgate),
    np.einsum("btd,btf->df", x, dup),
    np.einsum("btf,btd->fd", h, cot),
  )
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("forms", sorted(FORMS))
def test_rope_forms_match_numpy(forms):
  """`rope.apply_rope` in either form of the rotation (split/concatenate, or the halves
  swapped by a flip) against numpy's rotate-half with llama3-scaled frequencies: values,
  and the gradient (the inverse rotation of the cotangent)."""
  rng = np.random.default_rng(6)
  b, t, n, h = 2, 5, 3, 8
  scaling = tiny().rope_scaling
  x = rng.normal(size=(b, t, n, h)).astype(np.float32)
  pos = rng.integers(0, 300, size=(b, t)).astype(np.int32)
  cot = rng.normal(size=(b, t, n, h)).astype(np.float32)
  ang = pos[..., None, None].astype(np.float64) * rope.inv_frequencies(h, 1e6, scaling)
  cos, sin = np.cos(ang), np.sin(ang)
  rotate = lambda v, sin: np.concatenate(
    [
      v[..., : h // 2] * cos - v[..., h // 2 :] * sin,
      v[..., h // 2 :] * cos + v[..., : h // 2] * sin,
    ],
    axis=-1,
  )
  apply = lambda x: rope.apply_rope(x, jnp.asarray(pos), 1e6, scaling, FORMS[forms])
  np.testing.assert_allclose(apply(x), rotate(x, sin), atol=1e-4)
  dx = jax.grad(lambda x: jnp.sum(apply(x) * cot))(x)
  np.testing.assert_allclose(dx, rotate(cot, -sin), atol=1e-4)


def test_params_carry_logical_axes_only():
  abstract = nnx.state(nnx.eval_shape(lambda: init_model(tiny())), nnx.Param)
  names = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers"}
  specs = nnx.get_partition_spec(abstract)
  for path, spec in jax.tree_util.tree_leaves_with_path(
    specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  ):
    assert spec is not None and set(spec) <= names, (path, spec)
  assert nnx.get_partition_spec(abstract)["layers"]["attention"][
    "wq"
  ] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")


def test_cwm_32b_preset_matches_spec():
  from cwm_jax.model import cwm_32b

  cfg = cwm_32b()
  assert cfg.param_count() == 32_581_097_472
  assert len(cfg.global_layers) == 17 and cfg.global_layers[-1] == 63
  assert cfg.layer_windows == meta_layer_windows(64, 8192, 131072)
  state = nnx.state(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == 32_581_097_472


@pytest.mark.parametrize(
  "bad, message",
  [
    (dict(n_heads=6, n_kv_heads=4), "divisible by n_kv_heads"),
    (dict(head_dim=15), "head_dim=15 must be even"),
    (dict(layer_windows=(16, 0, 16, 16)), "windows < 1"),
    (dict(layer_windows=(16, 16, 16)), "one window per layer"),
  ],
)
def test_invalid_configs_raise(bad, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**bad)


@pytest.mark.parametrize(
  "bad, message",
  [
    (dict(attention_impl="magic"), "attention_impl='magic' must be one of"),
    (dict(remat_policy="most"), "remat_policy='most' must be one of"),
    (dict(attention_chunk=-1), "attention_chunk=-1 must be >= 1"),
  ],
)
def test_invalid_execution_raises(bad, message):
  with pytest.raises(ConfigError, match=message):
    Execution(**bad)
  with pytest.raises(ConfigError, match="unknown fields"):
    Execution.from_mapping({"attention_backend": "chunked"})


def test_model_config_holds_architecture_only():
  """Execution choices are not ModelConfig fields, and checkpoint metadata written
  before the split (with them inside) still reads."""
  with pytest.raises(TypeError):
    tiny(attention_impl="chunked")
  old = dict(
    tiny().to_dict(),
    attention_impl="chunked",
    remat_policy="full",
    param_dtype="bfloat16",
    scan_layers=True,
    attention_chunk=8,
    compute_dtype="bfloat16",
    global_attention_impl="",
    context_parallel="none",
  )
  assert ModelConfig.from_dict(old) == tiny()
  with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
    ModelConfig.from_dict(dict(tiny().to_dict(), colour="blue"))
