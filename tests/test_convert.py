"""Checkpoint conversion: orbax <-> Hugging Face <-> Meta DCP, exact and atomic.

References: transformers' CwmForCausalLM (logits, loading), a Meta checkpoint
built here by hand with torch's own DCP save and Meta's interleaved RoPE rows,
and a few lines of numpy RoPE in both layouts.
"""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers

from cwm_jax.base import ConfigError
from cwm_jax.checkpoint import conversion as cv
from cwm_jax.checkpoint import hf, manager, meta
from cwm_jax.checkpoint.names import HF, META
from cwm_jax.model.config import cwm_32b, tiny
from cwm_jax.model.rope import inv_frequencies
from cwm_jax.model.transformer import model_from_params

CFG = tiny(n_layers=3)  # layers: global, local, global (Meta's last-layer rule)
TOKENS = np.array([[1, 7, 99, 3, 250, 17, 42, 8, 300, 5, 11, 77, 2, 64, 128, 9, 33, 21, 400, 6]])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_checkpoint(directory, dtype):
  hcfg = hf.config_to_hf(CFG, dtype=dtype, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.CwmForCausalLM(transformers.CwmConfig(**hcfg)).to(getattr(torch, dtype))
  model.save_pretrained(directory)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "marker": 123}, f)
  return model.eval()


@pytest.fixture(scope="module")
def hf32(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("hf32") / "ckpt")
  return d, _hf_checkpoint(d, "float32")


@pytest.fixture(scope="module")
def orbax32(hf32, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("orb") / "ckpt")
  cv.convert(hf32[0], d, "orbax")
  return d


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def _our_logits(directory):
  cfg, params = manager.restore_params(directory)
  return np.asarray(model_from_params(cfg, params)(TOKENS))


def _arch(cfg):
  """The architecture (ModelConfig holds nothing else)."""
  return cfg


def _bits(a):
  return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_orbax_hf_is_bit_identical(tmp_path, dtype):
  src, mid, out = str(tmp_path / "hf"), str(tmp_path / "orb"), str(tmp_path / "hf2")
  _hf_checkpoint(src, dtype)
  cv.convert(src, mid, "orbax")
  shard_limit = 150_000
  summary = cv.convert(mid, out, "hf", max_shard_bytes=shard_limit)
  a, b = hf.SafetensorsReader(src), hf.SafetensorsReader(out)
  assert a.names() == b.names() and summary["tensors"] == len(a.names())
  for name in a.names():
    x, y = a.get(name), b.get(name)
    assert x.dtype == y.dtype == np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16)
    assert x.shape == y.shape and np.array_equal(_bits(x), _bits(y)), name
  shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  assert len(shards) > 2 and set(b.weight_map.values()) == set(shards)
  largest = max(np.prod(a.shape(n)) * 4 for n in a.names())
  assert all(
    os.path.getsize(os.path.join(out, s)) <= max(shard_limit, largest) + 4096 for s in shards
  )
  c_src, c_out = (json.load(open(os.path.join(d, "config.json"))) for d in (src, out))
  assert hf.config_from_hf(c_src) == hf.config_from_hf(c_out)
  for key in (
    "layer_types",
    "sliding_window",
    "rope_parameters",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "model_type",
    "architectures",
  ):
    assert c_out[key] == c_src[key], key
  assert json.load(open(os.path.join(out, "tokenizer_config.json")))["marker"] == 123


def test_meta_permutation_matches_interleaved_rope():
  """q from Meta weights + interleaved RoPE == q from HF weights + rotate-half RoPE,
  up to the per-head row order (pair (2i, 2i+1) <-> (i, i + H/2))."""
  rng = np.random.default_rng(1)
  n, h, d, t = CFG.n_heads, CFG.head_dim, CFG.dim, 9
  w_hf = rng.standard_normal((n * h, d)).astype(np.float32)
  hf_e, meta_e = HF[5], META[5]
  assert hf_e.ours == meta_e.ours == ("layers", "attention", "wq")
  w_meta = meta_e.to_theirs(hf_e.to_ours(w_hf, CFG), CFG)
  x = rng.standard_normal((t, d)).astype(np.float64)
  ang = np.arange(t)[:, None] * inv_frequencies(h, CFG.rope_theta, CFG.rope_scaling)  # [T, H/2]
  q = (x @ w_hf.T).reshape(t, n, h)
  q1, q2 = q[..., : h // 2], q[..., h // 2 :]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  q_hf = np.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], -1)
  qm = (x @ w_meta.T).reshape(t, n, h // 2, 2)
  rotated = (qm[..., 0] + 1j * qm[..., 1]) * np.exp(1j * ang)[:, None]  # Meta's complex rope
  q_meta = np.stack([rotated.real, rotated.imag], -1).reshape(t, n, h)
  np.testing.assert_allclose(q_meta[..., 0::2], q_hf[..., : h // 2], atol=1e-9)
  np.testing.assert_allclose(q_meta[..., 1::2], q_hf[..., h // 2 :], atol=1e-9)
  # The same rows as transformers' convert_llama_weights_to_hf permute (Meta -> HF).
  back = w_meta.reshape(n, h // 2, 2, d).transpose(0, 2, 1, 3).reshape(n * h, d)
  np.testing.assert_array_equal(back, w_hf)


def _meta_by_hand(hf_dir, out, prefix="model."):
  """A Meta checkpoint from an HF one: Meta names, interleaved q/k rows, params.json."""
  reader = hf.SafetensorsReader(hf_dir)

  def to_meta_rows(w, n_heads):  # inverse of the HF conversion script's permute
    rows, dim = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)

  renames = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
  }
  sd = {}
  for name in reader.names():
    w = reader.get(name)
    if name in renames:
      sd[renames[name]] = w
      continue
    i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
    if rest == "self_attn.q_proj.weight":
      w = to_meta_rows(w, CFG.n_heads)
    elif rest == "self_attn.k_proj.weight":
      w = to_meta_rows(w, CFG.n_kv_heads)
    sub = {
      "self_attn.q_proj.weight": "attention.wq.weight",
      "self_attn.k_proj.weight": "attention.wk.weight",
      "self_attn.v_proj.weight": "attention.wv.weight",
      "self_attn.o_proj.weight": "attention.wo.weight",
      "mlp.gate_proj.weight": "feed_forward.w1.weight",
      "mlp.up_proj.weight": "feed_forward.w3.weight",
      "mlp.down_proj.weight": "feed_forward.w2.weight",
      "input_layernorm.weight": "attention_norm.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight",
    }[rest]
    sd[f"layers.{i}.{sub}"] = w
  dcp.save(
    {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
    storage_writer=dcp.FileSystemWriter(out),
    no_dist=True,
  )
  params = {
    "model": {  # dim 64: int(2*4*64/3) = 170, int(170 * 0.75) = 127 -> 128 (multiple_of 32)
      "dim": 64,
      "n_layers": 3,
      "n_heads": 4,
      "n_kv_heads": 2,
      "head_dim": 16,
      "vocab_size": 512,
      "max_seq_len": 4096,
      "ffn_exp": 4,
      "ffn_dim_multiplier": 0.75,
      "multiple_of": 32,
      "norm_eps": 1e-5,
      "rope_theta": 1e6,
      "pos_embed_impl": "scaled_rope",
      "scaled_rope": {
        "scale_factor": 4,
        "old_context_len": 64,
        "low_freq_factor": 1,
        "high_freq_factor": 4,
      },
      "window_attn": {
        "window_pattern": 4,
        "global_window": 4096,
        "local_window": 16,
        "global_last_layer": True,
      },
    }
  }
  with open(os.path.join(out, "params.json"), "w") as f:
    json.dump(params, f)
  return sd


def _leaves(params):
  out = {}
  for e in HF:
    node = params
    for key in e.ours:
      node = node[key]
    out[e.ours] = np.asarray(node)
  return out


def test_meta_to_orbax_gives_hf_logits(hf32, orbax32, tmp_path):
  src, model = hf32
  meta_dir, orb = str(tmp_path / "meta"), str(tmp_path / "orb")
  _meta_by_hand(src, meta_dir)
  assert _arch(
    meta.config_from_meta(json.load(open(os.path.join(meta_dir, "params.json"))))
  ) == _arch(CFG)
  cv.convert(meta_dir, orb, "orbax")
  a, b = _leaves(manager.restore_params(orb)[1]), _leaves(manager.restore_params(orbax32)[1])
  for path in a:  # the same weights as through HF, hence the same logits
    np.testing.assert_array_equal(a[path], b[path])
  np.testing.assert_allclose(_our_logits(orb), _torch_logits(model), atol=1e-4, rtol=0)


def test_meta_names_without_model_prefix_are_accepted(hf32, orbax32, tmp_path):
  meta_dir, orb = str(tmp_path / "meta"), str(tmp_path / "orb")
  _meta_by_hand(hf32[0], meta_dir, prefix="")
  cv.convert(meta_dir, orb, "orbax")
  a, b = _leaves(manager.restore_params(orb)[1]), _leaves(manager.restore_params(orbax32)[1])
  for path in a:
    np.testing.assert_array_equal(a[path], b[path])


def test_orbax_to_meta_matches_hand_built_meta(hf32, orbax32, tmp_path):
  hand = _meta_by_hand(hf32[0], str(tmp_path / "hand"))
  out, back = str(tmp_path / "meta"), str(tmp_path / "orb")
  cv.convert(orbax32, out, "meta")
  state = {"model." + k: torch.empty(v.shape, dtype=torch.float32) for k, v in hand.items()}
  dcp.load(state, storage_reader=dcp.FileSystemReader(out), no_dist=True)  # torch's reader
  for k, v in hand.items():
    np.testing.assert_array_equal(state["model." + k].numpy(), v, err_msg=k)
  assert _arch(meta.config_from_meta(json.load(open(os.path.join(out, "params.json"))))) == _arch(
    CFG
  )
  cv.convert(out, back, "orbax")
  (c1, p1), (c2, p2) = manager.restore_params(orbax32), manager.restore_params(back)
  assert c1 == c2
  a, b = _leaves(p1), _leaves(p2)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path])


def test_converted_checkpoints_load_in_transformers_and_score(hf32, orbax32, tmp_path):
  """orbax -> hf loads in transformers with the original logits; `score` on the orbax
  checkpoint matches transformers' log-probs."""
  from cwm_jax.checkpoint.load import load_model
  from cwm_jax.score import score_tokens

  out = str(tmp_path / "hf")
  cv.convert(orbax32, out, "hf")
  theirs = _torch_logits(transformers.CwmForCausalLM.from_pretrained(out).eval())
  np.testing.assert_array_equal(theirs, _torch_logits(hf32[1]))
  logp = torch.log_softmax(torch.tensor(theirs)[0, :-1], -1)
  ref = logp.gather(1, torch.tensor(TOKENS[0, 1:])[:, None])[:, 0].numpy()
  _, model = load_model(orbax32)
  np.testing.assert_allclose(score_tokens(model, TOKENS[0]), ref, atol=1e-4, rtol=0)


def _cli(args, env=None):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "cwm_jax.convert", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize("to", ["orbax", "hf"])
def test_killed_conversion_leaves_nothing_loadable(hf32, orbax32, tmp_path, to):
  src = orbax32 if to == "hf" else hf32[0]
  dst = str(tmp_path / "out")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "tests", "faults.py"),
      "convert",
      "--kill_after_tensors=4",
      "--src",
      src,
      "--dst",
      dst,
      "--to",
      to,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == -9, r.stderr[-2000:]
  assert not os.path.exists(dst)
  leftovers = os.listdir(tmp_path)
  assert leftovers and all(".partial-" in n for n in leftovers)
  for name in leftovers:
    with pytest.raises((ConfigError, FileNotFoundError, ValueError, KeyError)):
      cv.open_source(str(tmp_path / name))


def _hf_variant(src, dst, drop=None, add=None, config=None):
  os.makedirs(dst)
  reader = hf.SafetensorsReader(src)
  tensors = {n: reader.get(n) for n in reader.names() if n != drop}
  tensors.update(add or {})
  from safetensors.numpy import save_file

  save_file(tensors, os.path.join(dst, "model.safetensors"))
  c = json.load(open(os.path.join(src, "config.json")))
  c.update(config or {})
  json.dump(c, open(os.path.join(dst, "config.json"), "w"))
  return dst


def test_bad_sources_and_destinations_are_clear_errors(hf32, tmp_path):
  src = hf32[0]
  cases = [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "missing ['model.layers.1.mlp.up_proj"),
    (
      dict(add={"model.layers.3.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}),
      "unexpected ['model.layers.3",
    ),
    (dict(config={"intermediate_size": 96}), "the config implies (96, 64)"),
    (dict(config={"dtype": "bfloat16"}), "but the config declares bfloat16"),
  ]
  for i, (kw, message) in enumerate(cases):
    bad = _hf_variant(src, str(tmp_path / f"bad{i}"), **kw)
    with pytest.raises(
      ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
      cv.convert(bad, str(tmp_path / f"out{i}"), "orbax")
    assert not os.path.exists(tmp_path / f"out{i}")
  unknown = tmp_path / "unknown"
  unknown.mkdir()
  (unknown / "weights.bin").write_bytes(b"x")
  with pytest.raises(ConfigError, match="is not a Hugging Face"):
    cv.convert(str(unknown), str(tmp_path / "o"), "hf")
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("x")
  with pytest.raises(ConfigError, match="exists and is not empty"):
    cv.convert(src, str(full), "orbax")
  assert os.listdir(full) == ["keep.txt"]


def test_cli_exit_code_2_on_bad_input(tmp_path):
  (tmp_path / "junk").mkdir()
  r = _cli(["--src", str(tmp_path / "junk"), "--dst", str(tmp_path / "o"), "--to", "hf"])
  assert r.returncode == 2 and "is not a Hugging Face" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "o")


def test_params_json_roundtrip_keeps_layer_pattern_and_ffn():
  irregular = CFG.replace(n_layers=5, layer_windows=(4096, 16, 4096, 4096, 16))
  no_scaling = CFG.replace(rope_scaling=None, ffn_dim=100)
  for cfg in (
    CFG,
    cwm_32b(),
    tiny(n_layers=8),
    irregular,
    no_scaling,
    CFG.replace(layer_windows=(4096,) * 3),
  ):
    params = meta.config_to_meta(cfg)
    assert _arch(meta.config_from_meta(json.loads(json.dumps(params)))) == _arch(cfg)
  p32 = meta.config_to_meta(cwm_32b())["model"]
  assert p32["window_attn"] == {
    "global_window": 131072,
    "local_window": 8192,
    "window_pattern": 4,
    "global_last_layer": True,
  }
  assert "layer_windows" in meta.config_to_meta(irregular)["model"]["window_attn"]
