"""Trace prediction and evaluation against the real interpreter's traces."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.data.traces import format as trace_format
from cwm_jax.infer import evaluation as ev
from cwm_jax.infer import trace_predict as tp
from cwm_jax.infer.sampler import GenerateResult
from cwm_jax.model import abstract_model, model_from_params, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_OUT = """def add_all(xs):
    total = 0
    for x in xs:
        total += x
    return total


def inverse(x):
    return 10 // x


INPUTS = {"add_all": [([4, 5, 6],)], "inverse": [(0,)]}
"""
TRAINING = """def double(x):
    return 2 * x


INPUTS = {"double": [(3,)]}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
  path = tmp_path_factory.mktemp("programs")
  assert ev.is_held_out("prog_2.py") and not ev.is_held_out("prog_0.py")
  (path / "prog_2.py").write_text(HELD_OUT)
  (path / "prog_0.py").write_text(TRAINING)
  return str(path)


@pytest.fixture(scope="module")
def cases(programs):
  cases, skipped = ev.held_out_cases(programs, 8, 10.0)
  return cases, skipped


def test_held_out_cases_come_from_held_out_files_only(cases):
  cases, skipped = cases
  assert skipped == 0
  assert [f for _, f, _ in cases] == ["add_all", "inverse"]  # not `double` (prog_0.py)
  add_all = cases[0][2]
  assert add_all[0]["event"] == "call" and add_all[-1]["event"] == "return"
  assert json.loads(add_all[-1]["value"]) == 15
  assert cases[1][2][-1]["event"] in ("exception", "return")


class Oracle:
  """A stand-in generator answering each prompt with a given continuation text."""

  def __init__(self, tokenizer, answers):
    self.tokenizer, self.answers = tokenizer, answers

  def __call__(self, model, prompts, *, max_new_tokens, stop_ids):
    tokens = [self.tokenizer.encode_trace(self.answers[tuple(p)]) for p in prompts]
    return GenerateResult(tokens=tokens, logprobs=[[0.0] * len(t) for t in tokens])


def test_divergence_and_scores_with_stand_in_generator(cases):
  cases, _ = cases
  tok = Tokenizer.default()
  key = lambda s, f, fr: tuple(tok.encode_trace(tp.prompt_text(s, f, fr[0])))
  truth = {key(*c): trace_format.format_frames(list(c[2][1:])) for c in cases}
  preds = tp.predict_frames(None, tok, cases, max_new_tokens=64, generate_fn=Oracle(tok, truth))
  for pred, (_, _, frames) in zip(preds, cases):
    assert pred.finished and pred.divergence is None and pred.return_match
    assert pred.frames_matched == len(frames) - 1 == len(pred.real)
  # Corrupt frame 2's locals of add_all; cut inverse's trace before its end.
  source, function, frames = cases[0]
  wrong = [dict(f) for f in frames[1:]]
  wrong[2]["locals"] = {**wrong[2]["locals"], "total": json.dumps(999)}
  answers = {
    key(*cases[0]): trace_format.format_frames(wrong),
    key(*cases[1]): trace_format.format_frames(list(cases[1][2][1:2]), end=False),
  }
  bad = tp.predict_frames(None, tok, cases, max_new_tokens=64, generate_fn=Oracle(tok, answers))
  assert bad[0].divergence == 2 and bad[0].return_match
  assert bad[0].frames_matched == len(frames) - 2
  assert not bad[1].finished and bad[1].divergence == 1 and not bad[1].return_match
  view = tp.side_by_side(bad[0]).splitlines()
  assert view[2 + 2].startswith(">>  2") and "first divergence at frame 2" in view[-1]


def _tiny_model(tok):
  """A random tiny model for the project tokenizer, built from numpy (eager init is slow)."""
  cfg = tiny(
    vocab_size=tok.vocab_size, n_layers=2, dim=32, ffn_dim=64, global_window=1024, local_window=64
  )
  rng = np.random.RandomState(0)
  shapes = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
  params = jax.tree_util.tree_map_with_path(
    lambda path, s: (
      np.ones(s.shape, np.float32)
      if "scale" in str(path)
      else rng.normal(0, 0.02, s.shape).astype(np.float32)
    ),
    shapes,
  )
  return model_from_params(cfg, params)


def test_evaluate_tiny_model(programs, cases):
  cases, _ = cases
  tok = Tokenizer.default()
  model = _tiny_model(tok)
  config = ev.EvalConfig(
    programs_dir=programs, max_programs=8, max_new_tokens=8, batch_size=2, max_tokens=512
  )
  metrics = ev.evaluate(model, tok, config)
  assert metrics["trace_cases"] == 2 and metrics["trace_skipped"] == 0
  for name in (
    "trace_frame_exact",
    "trace_prefix",
    "trace_return_exact",
    "trace_full_exact",
    "trace_token_accuracy",
  ):
    assert 0.0 <= metrics[name] <= 1.0, name
  for source in ("code", "traces", "sft"):
    assert metrics[f"tokens_{source}"] > 0
    assert np.isclose(metrics[f"ppl_{source}"], np.exp(metrics[f"nll_{source}"]))
  # Independent teacher-forced NLL: one plain causal forward of the unpadded traces.
  docs, prompt_lens = [], []
  for source, function, frames in cases:
    docs.append(tok.encode_trace(trace_format.format_trace(source, function, list(frames))))
    prompt_lens.append(len(tok.encode_trace(tp.prompt_text(source, function, frames[0]))))
  batch = np.zeros((len(docs), max(map(len, docs))), np.int32)
  for i, d in enumerate(docs):
    batch[i, : len(d)] = d
  logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(batch))))
  nll = [
    -logp[i, np.arange(p - 1, len(d) - 1), d[p:]] for i, (d, p) in enumerate(zip(docs, prompt_lens))
  ]
  np.testing.assert_allclose(metrics["trace_nll"], np.concatenate(nll).mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="unknown eval config keys"):
    ev.evaluate(model, tok, {"max_programz": 1})


def test_predict_trace_cli(tmp_path):
  from cwm_jax.checkpoint.manager import save_params_checkpoint

  tok = Tokenizer.default()
  model = _tiny_model(tok)
  save_params_checkpoint(
    str(tmp_path / "ckpt"), model.cfg, nnx.state(model, nnx.Param).to_pure_dict()
  )
  (tmp_path / "prog.py").write_text(HELD_OUT)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "cwm_jax.predict_trace", *a],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  out = run(
    "--checkpoint",
    str(tmp_path / "ckpt"),
    f"{tmp_path / 'prog.py'}:add_all",
    "--args",
    "([4, 5, 6],)",
    "--max_new_tokens",
    "6",
    "--json",
  )
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout)
  real = tp.real_trace(HELD_OUT, "add_all", ([4, 5, 6],))
  assert [tp.frame_key(f) for f in got["real"]] == [tp.frame_key(f) for f in real[1:]]
  # 6 tokens cannot spell the first real frame: divergence at 0, no return value.
  assert got["first_divergence"] == 0 and got["return_match"] is False
  bad = run("--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "prog.py"))
  assert bad.returncode == 2 and "FILE.py:FUNCTION" in bad.stderr
