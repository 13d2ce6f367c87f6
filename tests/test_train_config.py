"""Config validation (CLI exit code 2 before compiling), the synthetic source,
FLOP counting and config variants."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cwm_jax.base import ConfigError
from cwm_jax.model.config import tiny
from cwm_jax.train import config as config_lib
from cwm_jax.train import flops
from cwm_jax.train.synthetic import SyntheticSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_bad_mesh_exits_2_before_compiling(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    JAX_LOG_COMPILES="1",
  )
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.train",
      "--config",
      os.path.join(ROOT, "configs/smoke.py"),
      "--workdir",
      str(workdir),
      "--config.mesh.fsdp=3",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "mesh.fsdp=3" in proc.stderr and "8 devices" in proc.stderr, proc.stderr[-2000:]
  assert "Compiling" not in proc.stderr and not workdir.exists()


@pytest.mark.parametrize(
  "update, names",
  [
    (dict(mesh=dict(fsdp=2, tensor=4)), ["n_kv_heads=2", "mesh.tensor=4"]),
    (dict(batch_size=6, mesh=dict(data=4, fsdp=2)), ["batch_size=6", "mesh.data*mesh.fsdp=8"]),
  ],
)
def test_train_rejects_heads_and_batch_before_compiling(tmp_path, update, names):
  from cwm_jax.train import lm  # pylint: disable=g-import-not-at-top

  c = config_lib.base_config()
  c.mesh.update(update.pop("mesh"))
  c.update(update)
  with pytest.raises(ConfigError) as e:
    lm.train(c, str(tmp_path / "run"))
  assert all(n in str(e.value) for n in names), str(e.value)
  assert not (tmp_path / "run").exists()


def test_validate_collects_every_error():
  c = config_lib.base_config()
  c.update(dict(batch_size=6, grad_accum=4, seq_len=30))
  c.mesh.update(dict(fsdp=-1, sequence=4))
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, tiny(), 8, 4)
  msg = str(e.value)
  assert "grad_accum=4" in msg and "4 processes" in msg and "mesh.sequence=4" in msg


def test_variant_parsing():
  assert config_lib.parse_variant("dtype=bfloat16, accum=2") == {"dtype": "bfloat16", "accum": "2"}
  assert config_lib.parse_variant("") == {}
  with pytest.raises(ConfigError, match="key=value"):
    config_lib.parse_variant("oops")


def _source(**kw):
  args = dict(batch_size=4, seq_len=48, vocab=100, seed=3, mean_doc_len=8, prompt_fraction=0.25)
  return SyntheticSource(**{**args, **kw})


def test_synthetic_batch_contract():
  b = next(_source())
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
    "inputs": ((4, 48), "int32"),
    "targets": ((4, 48), "int32"),
    "positions": ((4, 48), "int32"),
    "segment_ids": ((4, 48), "int32"),
    "weights": ((4, 48), "float32"),
  }
  for r in range(4):
    seg, pos = b["segment_ids"][r], b["positions"][r]
    real = seg > 0
    assert np.all(b["weights"][r][~real] == 0) and np.all(b["inputs"][r][~real] == 0)
    for s in np.unique(seg[real]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(pos[idx], np.arange(len(idx)))  # restart per document
      # targets are the next token of the same document
      assert np.array_equal(b["targets"][r][idx[:-1]], b["inputs"][r][idx[1:]])
      # the first quarter (rounded down) of each document is an unweighted prompt
      assert b["weights"][r][idx].sum() == len(idx) - int(0.25 * len(idx))


def test_synthetic_resume_and_process_split():
  a = _source()
  next(a)
  state = a.get_state()
  expect = next(a)
  b = _source()
  b.set_state(state)
  got = next(b)
  assert all(np.array_equal(expect[k], got[k]) for k in expect)
  halves = [_source(process_index=i, process_count=2) for i in range(2)]
  for h in halves:
    h.set_state(state)
  joined = [np.concatenate([next(h)["inputs"] for h in halves])]
  assert np.array_equal(joined[0], expect["inputs"])


def test_flops_count_real_windows_without_padding():
  cfg = tiny(n_layers=2, local_window=3, global_window=4096)
  cfg = cfg.replace(layer_windows=(3, 4096))
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 0]])
  segments = np.array([[1, 1, 1, 1, 1, 2, 2, 0]])  # last token is padding
  # keys per query: window 3 -> 1,2,3,3,3 + 1,2 = 15; global -> 1..5 + 1,2 = 18
  assert flops.attention_keys(cfg, positions, segments) == 33
  d, h, n, k, f, v = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size
  per_token = 6 * (2 * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * v)
  assert flops.batch_flops(cfg, positions, segments) == 7 * per_token + 12 * n * h * 33
