"""KV-cache sampler: cached logits == full forward, greedy == transformers, ring shapes,
sampled log-probs == teacher-forced ones, the decode step scanned over layers."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax.checkpoint.hf import config_to_hf
from cwm_jax.checkpoint.load import load_params
from cwm_jax.infer import cache as kv
from cwm_jax.infer import sampler
from cwm_jax.kernels import backend
from cwm_jax.model import Execution, abstract_model, cwm_32b, model_from_params, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  fields = dict(n_layers=3, local_window=6, vocab_size=96, dim=32, ffn_dim=64, global_window=64)
  fields.update(kw)
  return tiny(**fields)


# Every generate call below uses these shapes (2 prompts, <= 32 tokens, 14 new), so the
# jitted loop compiles once per sharding.
PROMPT_LENGTHS, NEW = (3, 11), 14  # shorter and longer than the window (6)


def test_ring_buffer_shapes():
  cfg = cwm_32b()
  cache = jax.eval_shape(lambda: kv.init_cache(cfg, 2, 20000, jnp.bfloat16))
  keys, values = dict(zip(cache.layout.windows, cache.k)), dict(zip(cache.layout.windows, cache.v))
  assert keys[8192].shape == (47, 2, 8, 8192, 128)  # local layers: O(window)
  assert keys[131072].shape == (17, 2, 8, 20000, 128)  # global layers: whole sequence
  assert values[8192].shape == (47, 2, 8, 128, 8192)  # values transposed
  layout = kv.cache_layout(_cfg(), 5)  # shorter than the window: no bigger than needed
  assert layout.sizes == (5, 5) and layout.groups == (1, 0, 1) and layout.slots == (0, 0, 1)


def test_slot_columns_by_hand():
  # After 6 writes into 4 slots: columns 4, 5 overwrote slots 0, 1.
  np.testing.assert_array_equal(kv.slot_columns(6, 4), [4, 5, 2, 3])
  np.testing.assert_array_equal(kv.slot_columns(2, 4), [0, 1, -1, -1])


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """A random transformers CwmForCausalLM (global, local, local layers; window 6), saved
  with save_pretrained, and the same model loaded through load_params."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = _cfg()
  torch.manual_seed(0)
  hf = transformers.CwmForCausalLM(
    transformers.CwmConfig(
      **config_to_hf(cfg, dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    )
  ).eval()
  with torch.no_grad():  # a larger init keeps greedy choices far from ties
    for p in hf.parameters():
      if p.dim() > 1:
        p.normal_(0, 0.2)
  path = str(tmp_path_factory.mktemp("hf"))
  hf.save_pretrained(path)
  cfg, params = load_params(path)
  return hf, cfg, params, model_from_params(cfg, params)


def _hf_logprobs(hf, tokens):
  import torch

  with torch.no_grad():
    return torch.log_softmax(hf(torch.tensor([tokens])).logits[0], -1).numpy()


def test_cached_decoding_matches_full_forward(hf_pair):
  hf, cfg, _, model = hf_pair
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, 96, n).tolist() for n in PROMPT_LENGTHS]
  feed = rng.randint(0, 96, (2, NEW))  # 14 steps wrap the 6-slot ring twice
  tokens, n = sampler.right_pad(prompts, 8)
  cache = kv.init_cache(cfg, 2, tokens.shape[1] + NEW, jnp.float32)
  logits, cache = nnx.jit(sampler.prefill)(model, cache, jnp.asarray(tokens), jnp.asarray(n))
  decode = nnx.jit(sampler.decode_step)
  got = [logits]
  for t in range(NEW):
    logits, cache = decode(model, cache, jnp.asarray(feed[:, t], jnp.int32))
    got.append(logits)
  got = jax.nn.log_softmax(np.stack(got, 1), -1)  # [B, NEW + 1, V]
  for b, prompt in enumerate(prompts):  # full forward pass of the unpadded row
    want = _hf_logprobs(hf, prompt + feed[b].tolist())[len(prompt) - 1 :]
    np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0)


def test_greedy_and_logprobs_match_transformers(hf_pair):
  import torch

  hf, cfg, _, model = hf_pair
  rng = np.random.RandomState(1)
  prompts = [rng.randint(0, 96, n).tolist() for n in PROMPT_LENGTHS]
  result = sampler.generate(model, prompts, max_new_tokens=NEW)
  for prompt, tokens, logprobs in zip(prompts, result.tokens, result.logprobs):
    ids = torch.tensor([prompt])
    want = hf.generate(
      ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert tokens == want
    logp = _hf_logprobs(hf, prompt + tokens)[len(prompt) - 1 : -1]
    np.testing.assert_allclose(logprobs, logp[np.arange(NEW), tokens], atol=1e-4)
  # Stop tokens: row 0 stops at its 5th token (kept); row 1 at its first occurrence, if any.
  stop = result.tokens[0][4]
  stopped = sampler.generate(model, prompts, max_new_tokens=NEW, stop_ids=[stop])
  for full, cut in zip(result.tokens, stopped.tokens):
    n = full.index(stop) + 1 if stop in full else len(full)
    assert cut == full[:n]
  assert len(stopped.tokens[0]) == result.tokens[0].index(stop) + 1
  # The same generation with the model and cache sharded over a data x tensor mesh.
  mesh = jax.make_mesh(
    (2, 2),
    ("data", "tensor"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=jax.devices()[:4],
  )
  rules = (
    ("batch", "data"),
    ("act_kv_heads", "tensor"),
    ("act_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
  )
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    cache = jax.jit(lambda: kv.init_cache(cfg, 2, 16, jnp.float32))()
    for buf in cache.k + cache.v:
      assert buf.sharding.is_equivalent_to(
        NamedSharding(mesh, P(None, "data", "tensor", None, None)), buf.ndim
      )
    assert sampler.generate(model, prompts, max_new_tokens=NEW).tokens == result.tokens


def test_top_p_filter_by_hand():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(sampler.top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])  # 0.5 < 0.7 <= 0.8
  kept = np.isfinite(np.asarray(sampler.top_p_filter(logits, 0.5)))
  np.testing.assert_array_equal(kept, [[True, False, False, False]])
  assert np.isfinite(np.asarray(sampler.top_p_filter(logits, 1.0))).all()


def test_sampling_frequencies():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k: sampler.sample_token(logits, k, 0.5, 0.95, greedy=False)[0][0]))
  freq = np.bincount(np.asarray(draw(keys)), minlength=4) / 4000
  p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2  # temperature 0.5 squares the probabilities
  p /= p.sum()  # [0.685, 0.247, 0.062, 0.007]
  p[3] = 0  # top-p 0.95 drops the last token
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)


def test_bad_inputs_are_named(hf_pair):
  model = hf_pair[3]
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sampler.generate(model, [[1, 500]], max_new_tokens=2)
  with pytest.raises(ValueError, match="empty prompt"):
    sampler.generate(model, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_seq_len"):
    sampler.generate(model, [[1]], max_new_tokens=100)


def test_sample_cli_on_orbax_checkpoint(tmp_path, hf_pair):
  from cwm_jax.checkpoint.manager import save_params_checkpoint

  _, cfg, params, model = hf_pair
  save_params_checkpoint(str(tmp_path / "ckpt"), cfg, params)
  want = sampler.generate(model, [[5, 17, 9], [1]], max_new_tokens=NEW)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "cwm_jax.sample", *a],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  out = run(
    "--checkpoint",
    str(tmp_path / "ckpt"),
    "--prompt_ids",
    "5,17,9",
    "--max_new_tokens",
    str(NEW),
    "--json",
  )
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout)
  assert got["tokens"] == want.tokens[0]
  np.testing.assert_allclose(got["logprobs"], want.logprobs[0], atol=1e-5)


def _random_model(cfg, seed):
  rng = np.random.RandomState(seed)
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  return model_from_params(
    cfg, jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  )


@nnx.jit
def _forward(model, tokens_BT, positions_BT, segment_ids_BT):
  return model(tokens_BT, positions_BT, segment_ids_BT)


def _teacher_forced(model, prompts, continuations):
  """Float32 log-probs [B, N + 1, V] of each continuation token (and the one after) from
  the training forward over the right-padded rows: padding is its own document."""
  tokens, lengths = sampler.right_pad([p + list(c) for p, c in zip(prompts, continuations)])
  cols = np.arange(tokens.shape[1])[None]
  positions, segments = np.broadcast_to(cols, tokens.shape), cols < lengths[:, None]
  logits = _forward(model, *(jnp.asarray(a, jnp.int32) for a in (tokens, positions, segments)))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  n = len(continuations[0])
  return np.stack([logp[b, len(p) - 1 : len(p) + n] for b, p in enumerate(prompts)])


def test_sampled_logprobs_equal_teacher_forced(hf_pair):
  """RL's old-policy log-probs: what sampling returns is the model's own forward."""
  model = hf_pair[3]
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 96, n).tolist() for n in PROMPT_LENGTHS]
  result = sampler.generate(model, prompts, max_new_tokens=NEW, temperature=1.3, top_p=0.9, seed=3)
  assert [len(t) for t in result.tokens] == [NEW, NEW]
  want = _teacher_forced(model, prompts, result.tokens)[:, :-1]
  want = np.take_along_axis(want, np.asarray(result.tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(result.logprobs, want, atol=2e-5, rtol=0)


def test_unrolled_and_scanned_decoding_agree(hf_pair, monkeypatch):
  """The decode loop on layers sliced before it (CPU default), on the scanned stack, and
  an unrolled execution give the same tokens and log-probs."""
  _, cfg, params, model = hf_pair
  unrolled = model_from_params(cfg, params, Execution(scan_layers=False))
  prompts = [[5, 17, 9], list(range(1, 12))]
  want = sampler.generate(model, prompts, max_new_tokens=NEW)
  got = sampler.generate(unrolled, prompts, max_new_tokens=NEW)
  monkeypatch.setattr(sampler, "UNROLL_DECODE_LAYERS", 0)
  scanned = sampler.generate(model, prompts, max_new_tokens=NEW)
  for other in (got, scanned):
    assert other.tokens == want.tokens
    np.testing.assert_allclose(other.logprobs, want.logprobs, atol=1e-5)


def test_splash_prefill_samples_what_the_default_backend_does(hf_pair):
  """Splash ('auto' on TPU; Pallas interpret mode here) under a prefill of prompts padded
  to 32 columns, not its 128-row tiles: the same tokens and log-probs."""
  _, cfg, params, model = hf_pair
  splash = model_from_params(cfg, params, Execution(attention_impl="splash"))
  prompts = [[5, 17, 9], list(range(1, 12))]
  want = sampler.generate(model, prompts, max_new_tokens=4)
  got = sampler.generate(splash, prompts, max_new_tokens=4)
  assert got.tokens == want.tokens
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_cache_layouts_agree(hf_pair, monkeypatch):
  """CPU's cache (keys [L, B, K, S, H], values [L, B, K, H, S]) and the accelerators'
  ([L, B, S, K, H]) give the same tokens and log-probs over a prefill, a decode and an
  appended turn (a block attended beside the ring)."""
  model = hf_pair[3]
  prompts = [[5, 17, 9], list(range(1, 12))]

  def two_turns(pad):  # prompt widths no other call compiles: a fresh trace of each step
    turns = sampler.Turns(model, 2, 48, pad_multiple=pad)
    first = turns(prompts, 5)
    second = turns([p + t + [7, 8, 9] for p, t in zip(prompts, first.tokens)], 5)
    return turns.cache.layout.transposed, first, second

  transposed, *want = two_turns(48)
  accelerator_cache = dataclasses.replace(backend.CPU_FORMS, transposed_cache=False)
  monkeypatch.setattr(backend, "forms", lambda platform=None: accelerator_cache)
  accelerator, *got = two_turns(40)
  assert transposed and not accelerator
  for w, g in zip(want, got):
    assert g.tokens == w.tokens
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


def test_cache_by_layer_round_trip():
  cfg = _cfg(n_layers=5, layer_windows=(4, 64, 6, 4, 64))
  cache = kv.init_cache(cfg, 2, 12, jnp.float32)
  rng = np.random.RandomState(0)
  cache = cache.replace(
    k=tuple(jnp.asarray(rng.randn(*b.shape), jnp.float32) for b in cache.k),
    v=tuple(jnp.asarray(rng.randn(*b.shape), jnp.float32) for b in cache.v),
  )
  split = kv.by_layer(cache)
  assert split.layout.groups == (0, 1, 2, 3, 4) and split.layout.sizes == (4, 12, 6, 4, 12)
  layout = cache.layout
  for i in range(5):  # layer i's buffers, as arrays of their own
    np.testing.assert_array_equal(split.k[i][0], cache.k[layout.groups[i]][layout.slots[i]])
    np.testing.assert_array_equal(split.v[i][0], cache.v[layout.groups[i]][layout.slots[i]])
  back = kv.by_window(split)
  assert back.layout == cache.layout
  for a, b in zip(back.k + back.v, cache.k + cache.v):
    np.testing.assert_array_equal(a, b)


@pytest.mark.speed_check
def test_cpu_decode_step_reads_the_cache_in_place(hf_pair):
  """In XLA's optimized decode loop, the only ops that output an array of a layer's cache
  shape are the in-place scatters writing the new token, bitcasts and the loop carry's
  get-tuple-elements. (With [B, S, K, H]
  buffers read by a slice of a stacked group, the body held a transposed copy of every
  layer's keys and values: `transpose_copy_fusion`s of that shape.)
  Speed check: it reads XLA:CPU's compiled HLO, so an XLA upgrade that trips it is a speed
  regression, not a wrong result."""
  model = hf_pair[3]
  graphdef, state = nnx.split(model)
  cache = kv.init_cache(model.cfg, 2, 16, jnp.float32)
  _, cache = jax.jit(lambda s, c, t: sampler.prefill(nnx.merge(graphdef, s), c, t))(
    state, cache, jnp.ones((2, 4), jnp.int32)
  )
  text = (
    sampler._decode.lower(
      graphdef,
      state,
      cache,
      jnp.zeros((2, model.cfg.vocab_size)),
      jnp.zeros((2,), bool),
      jax.random.key(0),
      jnp.float32(1),
      jnp.float32(1),
      jnp.zeros((1,), jnp.int32),
      max_new=4,
      greedy=True,
      unrolled=True,
    )
    .compile()
    .as_text()
  )
  body = re.search(r"body=%([\w.\-]+)", text).group(1)
  ops = re.search(r"\n%%%s [^\n]*\{\n(.*?)\n\}" % re.escape(body), text, re.S).group(1)
  layer_shapes = {tuple(sorted(b.shape[1:])) for b in cache.k + cache.v}
  of_cache_shape = []
  for line in ops.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\S+?)\(", line)
    if m and m.group(2):
      dims = tuple(sorted(d for d in map(int, m.group(2).split(",")) if d != 1))
      if dims in {tuple(d for d in s if d != 1) for s in layer_shapes}:
        of_cache_shape.append((m.group(1), m.group(3)))
  assert of_cache_shape, "no scatter into the cache found: the HLO format changed"
  copies = [
    (name, op)
    for name, op in of_cache_shape
    if op not in ("bitcast", "get-tuple-element") and "scatter" not in name
  ]
  assert not copies, copies


def _weight_slices_per_step(model, unrolled):
  """Equations inside the decode loop's body that take a stacked layer weight (w1's
  shape [L, D, F]): a slice, or the layer scan that slices it each step."""
  graphdef, state = nnx.split(model)
  cache = kv.init_cache(model.cfg, 2, 16, jnp.float32).replace(empty=False)
  jaxpr = jax.make_jaxpr(
    lambda s, c: sampler._decode(
      graphdef,
      s,
      c,
      jnp.zeros((2, model.cfg.vocab_size)),
      jnp.zeros((2,), bool),
      jax.random.key(0),
      0.0,
      1.0,
      jnp.zeros((1,), jnp.int32),
      max_new=4,
      greedy=True,
      unrolled=unrolled,
    )
  )(state, cache).jaxpr
  stacked = model.layers.mlp.w1[...].shape
  found = []

  def walk(jaxpr, in_loop):
    for eqn in jaxpr.eqns:
      if in_loop and any(getattr(v.aval, "shape", None) == stacked for v in eqn.invars):
        found.append(eqn.primitive.name)
      for name, value in eqn.params.items():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub, in_loop or (eqn.primitive.name == "while" and name == "body_jaxpr"))

  walk(jaxpr, False)
  return len(found)


def test_cpu_decode_loop_reads_weights_without_slicing_them_each_step(hf_pair, monkeypatch):
  model = hf_pair[3]
  assert sampler.unroll_decode(model.cfg)  # CPU, 3 layers
  assert _weight_slices_per_step(model, unrolled=True) == 0
  assert _weight_slices_per_step(model, unrolled=False) > 0  # the layer scan slices them
  monkeypatch.setattr(sampler, "UNROLL_DECODE_LAYERS", 2)
  assert not sampler.unroll_decode(model.cfg)  # deeper models keep the scan


@pytest.mark.parametrize("windows", [(64, 64, 64), (4, 64, 6, 4, 64)])
def test_cached_decoding_other_window_groups(windows):
  """One window group (no switch), and three groups of unequal sizes in any order."""
  cfg = _cfg(n_layers=len(windows), layer_windows=windows)
  model = _random_model(cfg, seed=5)
  rng = np.random.RandomState(4)
  prompts = [rng.randint(0, 96, n).tolist() for n in (2, 9)]
  feed = rng.randint(0, 96, (2, 8))
  tokens, n = sampler.right_pad(prompts, 4)
  cache = kv.init_cache(cfg, 2, tokens.shape[1] + 8, jnp.float32)
  logits, cache = nnx.jit(sampler.prefill)(model, cache, jnp.asarray(tokens), jnp.asarray(n))
  decode, got = nnx.jit(sampler.decode_step), [logits]
  for t in range(8):
    logits, cache = decode(model, cache, jnp.asarray(feed[:, t], jnp.int32))
    got.append(logits)
  got = jax.nn.log_softmax(np.stack(got, 1), -1)
  np.testing.assert_allclose(got, _teacher_forced(model, prompts, feed), atol=2e-5, rtol=0)


def _count(jaxpr, name):
  """Equations of primitive `name` in a jaxpr, sub-jaxprs (scan/while/cond bodies) once each."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += _count(sub, name)
  return n


def _step_jaxprs(n_layers):
  cfg = _cfg(n_layers=n_layers)
  graphdef, state = nnx.split(abstract_model(cfg))  # traced abstractly: nothing allocated
  cache = jax.eval_shape(lambda: kv.init_cache(cfg, 2, 16, jnp.float32))
  tokens = jnp.ones((2, 4), jnp.int32)
  prefill = jax.make_jaxpr(lambda s, c: sampler.prefill(nnx.merge(graphdef, s), c, tokens))
  decode = jax.make_jaxpr(lambda s, c: sampler.decode_step(nnx.merge(graphdef, s), c, tokens[:, 0]))
  return prefill(state, cache).jaxpr, decode(state, cache.replace(empty=False)).jaxpr


def test_decode_step_scans_layers():
  """Prefill and decode trace one layer body, whatever the depth: compile time stays flat."""
  shallow, deep = _step_jaxprs(3), _step_jaxprs(11)
  for a, b in zip(shallow, deep):
    assert _count(a, "dot_general") == _count(b, "dot_general") > 0
    assert _count(a, "scan") == _count(b, "scan") >= 1
  lengths = [e.params["length"] for e in deep[1].eqns if e.primitive.name == "scan"]
  assert 11 in lengths  # the layer stack is one scan over all 11 layers


def test_cached_forward_bad_inputs(hf_pair):
  _, cfg, _, model = hf_pair
  cache = kv.init_cache(cfg, 1, 8, jnp.float32)
  _, cache = sampler.prefill(model, cache, jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="empty cache"):
    sampler.prefill(model, cache, jnp.ones((1, 2), jnp.int32))
  other = kv.init_cache(_cfg(layer_windows=(64, 5, 5)), 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="init_cache"):
    sampler.prefill(model, other, jnp.ones((1, 2), jnp.int32))


@pytest.mark.parametrize("windows", [None, (4, 64, 6, 4, 64)])
def test_ragged_rows_and_appended_blocks_match_the_full_forward(hf_pair, windows):
  """Rows that stop feeding while others decode, then blocks of unequal lengths (one longer
  than the 6-slot ring) appended to each row, then more decoding: every logit equals the
  training forward over the row's whole sequence."""
  if windows is None:
    cfg, model = hf_pair[1], hf_pair[3]
  else:
    cfg = _cfg(n_layers=len(windows), layer_windows=windows)
    model = _random_model(cfg, seed=6)
  rng = np.random.RandomState(7)
  rows = [rng.randint(0, 96, n).tolist() for n in (3, 11, 7)]
  tokens, n = sampler.right_pad(rows, 4)
  cache = kv.init_cache(cfg, 3, 40, jnp.float32)
  logits, cache = nnx.jit(sampler.prefill)(model, cache, jnp.asarray(tokens), jnp.asarray(n))
  got = [[(len(r) - 1, np.asarray(logits[b]))] for b, r in enumerate(rows)]
  decode, extend = nnx.jit(sampler.decode_step), nnx.jit(sampler.extend)

  def step(feed):  # one decode step; rows in `feed` take a random token
    token = rng.randint(0, 96, 3)
    logits_BV, new = decode(model, cache, jnp.asarray(token, jnp.int32), jnp.asarray(feed))
    for b in np.flatnonzero(feed):
      rows[b].append(int(token[b]))
      got[b].append((len(rows[b]) - 1, np.asarray(logits_BV[b])))
    return new

  for t in range(5):  # row 0 feeds 5 tokens, row 1 two, row 2 none
    cache = step(np.array([True, t < 2, False]))
  block_lengths = (2, 9, 4)
  block = np.zeros((3, 12), np.int32)
  for b, k in enumerate(block_lengths):
    block[b, :k] = rng.randint(0, 96, k)
  logits, cache = extend(model, cache, jnp.asarray(block), jnp.asarray(block_lengths))
  for b, k in enumerate(block_lengths):
    rows[b] += block[b, :k].tolist()
    got[b].append((len(rows[b]) - 1, np.asarray(logits[b])))
  np.testing.assert_array_equal(cache.length_B, [len(r) for r in rows])
  for _ in range(3):
    cache = step(np.ones(3, bool))
  full, lengths = sampler.right_pad(rows)
  cols = np.broadcast_to(np.arange(full.shape[1])[None], full.shape)
  want = np.asarray(
    jax.nn.log_softmax(
      _forward(
        model,
        jnp.asarray(full),
        jnp.asarray(cols, jnp.int32),
        jnp.asarray(cols < lengths[:, None], jnp.int32),
      ),
      -1,
    )
  )
  for b in range(3):
    for position, row_logits in got[b]:
      np.testing.assert_allclose(
        jax.nn.log_softmax(row_logits),
        want[b, position],
        atol=2e-5,
        rtol=0,
        err_msg=f"row {b} position {position}",
      )


@pytest.mark.parametrize("block", [128, 2])
def test_turns_feed_only_new_tokens_and_equal_a_fresh_prefill(hf_pair, block, monkeypatch):
  """Three turns with environment tokens between them, one row finished after the first:
  each turn's messages equal `generate` on the whole context (a fresh prefill); also when
  what a turn appends goes in several blocks of 2."""
  monkeypatch.setattr(sampler, "EXTEND_BLOCK", block)
  model = hf_pair[3]
  rng = np.random.RandomState(8)
  contexts = [rng.randint(3, 96, n).tolist() for n in (4, 9, 6)]
  stop = [int(rng.randint(3, 96))]
  turns = sampler.Turns(model, 3, 60, stop_ids=stop, pad_multiple=8)
  active = [True, True, True]
  for turn in range(3):
    live = [c for c, a in zip(contexts, active) if a]
    want = sampler.generate(model, live, max_new_tokens=5, stop_ids=stop)
    got = turns(contexts, 5, active)
    assert [t for t, a in zip(got.tokens, active) if a] == want.tokens
    assert all(not t for t, a in zip(got.tokens, active) if not a)
    np.testing.assert_allclose(
      np.concatenate([l for l, a in zip(got.logprobs, active) if a]),
      np.concatenate(want.logprobs),
      atol=2e-5,
    )
    for b in np.flatnonzero(active):  # the message, then 1-4 environment tokens
      contexts[b] += got.tokens[b] + rng.randint(3, 96, 1 + b + turn).tolist()
    active[2] = False
    assert all(h <= len(c) for h, c in zip(turns.held, contexts))
  with pytest.raises(ValueError, match="cache's 60 columns"):
    turns([c + [5] * (57 - len(c)) for c in contexts], 5, [True, True, False])


def test_slots_serve_every_prompt_as_generate_does(hf_pair):
  """Continuous batching: 3 cache rows serve 7 prompts (some longer than the local window,
  so refilled rows hold stale ring-buffer columns), rows stopping at a stop id or the
  budget free their slot; every prompt's greedy tokens and log-probs equal `generate`'s
  on all prompts at once."""
  model = hf_pair[3]
  rng = np.random.RandomState(11)
  prompts = [rng.randint(3, 96, n).tolist() for n in (3, 14, 5, 9, 4, 12, 7)]
  want = sampler.generate(model, prompts, max_new_tokens=10, pad_multiple=8)
  # a stop id the greedy rows do emit, so some rows end early and others run to the budget
  stop = [want.tokens[1][3]]
  want = sampler.generate(model, prompts, max_new_tokens=10, stop_ids=stop, pad_multiple=8)
  lengths = sorted({len(t) for t in want.tokens})
  assert len(lengths) > 1 and lengths[-1] == 10
  got = sampler.generate_slots(
    model, prompts, slots=3, max_new_tokens=10, round_tokens=4, stop_ids=stop, pad_multiple=8
  )
  assert got.tokens == want.tokens
  for g, w in zip(got.logprobs, want.logprobs):
    np.testing.assert_allclose(g, w, atol=2e-5)
  with pytest.raises(ValueError, match="slots=0"):
    sampler.generate_slots(model, prompts, slots=0, max_new_tokens=4)
