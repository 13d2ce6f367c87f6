"""Every class of bad input, driven through the real command-line programs.

Each case runs a program as `python -m cwm_jax.<program> ...` does (`runpy` as
`__main__`, in its own process) and must exit 2 with exactly one line on stderr
(`error: ...`) that names the flag, field or file, with no traceback, and must
create or change nothing: the output paths it names do not appear and the input
files (checkpoints, configs) are untouched.

For speed the processes are forked, four at a time, from one runner that has
imported jax, flax, orbax and grain once (not the programs: each child imports
its program fresh, as `python -m` would); one case is also run as a plain
`python -m` subprocess and must give the same exit code and stderr.
"""

import collections
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from cwm_jax.checkpoint import conversion, manager
from cwm_jax.model.config import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
SWEEP = os.path.join(ROOT, "configs", "sweeps", "smoke_lr.py")


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _halve(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _shard(d):
  return os.path.join(d, "model-00001-of-00001.safetensors")


def _fixtures(base) -> dict[str, str]:
  """Config and sweep files, good and corrupt checkpoints of a tiny model (vocab 512)."""
  fx = {"dir": str(base)}
  fx["syntax"] = _write(base / "syntax.py", "def get_config(:\n")
  fx["int"] = _write(base / "int.py", "def get_config():\n  return 5\n")
  fx["sweep_syntax"] = _write(base / "sweep_syntax.py", "def get_sweep(:\n")
  fx["sweep_int"] = _write(base / "sweep_int.py", "def get_sweep():\n  return 5\n")
  fx["rank_garbage"] = _write(base / "garbage.tiktoken", "this is not\n a rank file\n")
  fx["program"] = _write(base / "prog.py", "def f(x):\n  return x + 1\n")
  cfg = tiny(n_layers=1, vocab_size=512)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32), manager.params_target(cfg)
  )
  fx["orbax"] = str(base / "orbax")
  manager.save_params_checkpoint(fx["orbax"], cfg, params)
  fx["hf"], fx["meta"] = str(base / "hf"), str(base / "meta")
  conversion.convert(fx["orbax"], fx["hf"], "hf")
  conversion.convert(fx["orbax"], fx["meta"], "meta")

  def corrupt(name, src, damage):
    fx[name] = str(base / name)
    shutil.copytree(src, fx[name])
    damage(fx[name])

  corrupt("hf_truncated", fx["hf"], lambda d: _halve(_shard(d)))
  corrupt("hf_empty", fx["hf"], lambda d: open(_shard(d), "w").close())

  def bogus_header(d):
    with open(_shard(d), "r+b") as f:
      f.write(struct.pack("<Q", 10**12))

  corrupt("hf_header", fx["hf"], bogus_header)
  corrupt("hf_config", fx["hf"], lambda d: _write(os.path.join(d, "config.json"), '{"vocab'))
  state = lambda d: os.path.join(d, "0", "state")
  data_files = lambda d: [
    os.path.join(r, n) for r, _, ns in os.walk(state(d)) for n in ns if os.path.basename(r) == "d"
  ]
  corrupt("orbax_truncated", fx["orbax"], lambda d: [_halve(p) for p in data_files(d)])
  corrupt("orbax_missing", fx["orbax"], lambda d: os.remove(os.path.join(state(d), "_METADATA")))
  corrupt("orbax_no_item", fx["orbax"], lambda d: shutil.rmtree(os.path.join(d, "0", "meta")))
  corrupt(
    "orbax_meta", fx["orbax"], lambda d: _write(os.path.join(d, "0", "meta", "metadata"), "garbage")
  )
  corrupt(
    "dcp_metadata",
    fx["meta"],
    lambda d: open(os.path.join(d, ".metadata"), "wb").write(b"\x80\x04garbage" * 9),
  )
  corrupt(
    "dcp_truncated",
    fx["meta"],
    lambda d: _halve(
      max((os.path.join(d, n) for n in os.listdir(d) if n.endswith(".distcp")), key=os.path.getsize)
    ),
  )
  return fx


def _cases(fx, out) -> dict[str, tuple[list[str], list[str], list[str]]]:
  """name -> (argv after `python -m`, substrings of the one error line, paths that must
  not exist afterwards)."""
  w = lambda n: os.path.join(out, n)
  train = lambda n, *a: (["cwm_jax.train", f"--workdir={w(n)}", *a], [w(n)])
  cases = {
    "train_missing_config": (
      *train("t1", "--config=/no/such/config.py"),
      ["--config", "/no/such/config.py", "not found"],
    ),
    "train_config_syntax": (
      *train("t2", f"--config={fx['syntax']}"),
      ["--config", "syntax.py line 1"],
    ),
    "train_config_wrong_type": (
      *train("t3", f"--config={fx['int']}"),
      ["get_config() returned int", "ConfigDict"],
    ),
    "train_unknown_variant": (
      *train("t4", f"--config={SMOKE}:colour=red"),
      ["unknown variant keys ['colour']"],
    ),
    "train_unknown_field": (
      *train("t5", f"--config={SMOKE}", "--config.optimizr.lr=1"),
      ["no config field", "optimizr"],
    ),
    "train_nan_lr": (
      *train("t6", f"--config={SMOKE}", "--config.optimizer.lr=nan"),
      ["optimizer.lr=nan", "finite"],
    ),
    "train_range": (
      *train("t7", f"--config={SMOKE}", "--config.optimizer.b2=1.5"),
      ["optimizer.b2=1.5", "[0, 1)"],
    ),
    "train_on_corrupt": (
      *train("t8", f"--config={SMOKE}", "--config.checkpoint.on_corrupt=x"),
      ["checkpoint.on_corrupt", "fallback"],
    ),
    "train_init_from": (
      [
        "cwm_jax.train",
        f"--workdir={w('t9')}",
        f"--config={SMOKE}",
        f"--config.init_from.path={w('src')}",
      ],
      [w("t9"), w("src")],
      ["init_from.path", "no committed checkpoint"],
    ),
    "train_start_from": (
      [
        "cwm_jax.train",
        f"--workdir={w('t10')}",
        f"--config={SMOKE}:schedule=all,source=synthetic",
        f"--config.schedule.stages.pretrain.start_from={w('nostart')}",
      ],
      [w("t10"), w("nostart")],
      ["schedule.stages.pretrain.start_from"],
    ),
    "sample_temperature_inf": (
      ["cwm_jax.sample", f"--checkpoint={w('none')}", "--temperature=inf", "--prompt=x"],
      [w("none")],
      ["--temperature=inf", "finite"],
    ),
    "plan_hbm_nan": (
      ["cwm_jax.plan", f"--config={SMOKE}", "--hbm_gb=nan"],
      [],
      ["--hbm_gb=nan", "finite"],
    ),
    "train_workdir_is_file": (
      ["cwm_jax.train", f"--config={SMOKE}", f"--workdir={fx['program']}"],
      [],
      ["--workdir", "is a file"],
    ),
    "sweep_missing_config": (
      ["cwm_jax.sweep", "--config=/no/such.py", f"--sweep={SWEEP}", "--dry_run"],
      [],
      ["--config", "not found"],
    ),
    "sweep_syntax": (
      ["cwm_jax.sweep", f"--config={SMOKE}", f"--sweep={fx['sweep_syntax']}", "--dry_run"],
      [],
      ["--sweep", "line 1"],
    ),
    "sweep_wrong_type": (
      ["cwm_jax.sweep", f"--config={SMOKE}", f"--sweep={fx['sweep_int']}", "--dry_run"],
      [],
      ["get_sweep() returned int"],
    ),
    "sample_nan_temperature": (
      ["cwm_jax.sample", f"--checkpoint={fx['hf']}", "--prompt_ids=1,2", "--temperature=nan"],
      [],
      ["--temperature=nan"],
    ),
    "sample_top_p": (
      ["cwm_jax.sample", f"--checkpoint={fx['hf']}", "--prompt_ids=1,2", "--top_p=0"],
      [],
      ["--top_p"],
    ),
    "sample_garbage_tokenizer": (
      [
        "cwm_jax.sample",
        f"--checkpoint={fx['hf']}",
        "--prompt=hi",
        f"--tokenizer={fx['rank_garbage']}",
      ],
      [],
      ["garbage.tiktoken", "rank"],
    ),
    "sample_prompt_ids_vocab": (
      ["cwm_jax.sample", f"--checkpoint={fx['hf']}", "--prompt_ids=1,9999"],
      [],
      ["--prompt_ids", "vocabulary"],
    ),
    "convert_shard_zero": (
      ["cwm_jax.convert", f"--src={fx['hf']}", f"--dst={w('c1')}", "--to=hf", "--max_shard_gb=0"],
      [w("c1")],
      ["--max_shard_gb"],
    ),
    "convert_shard_nan": (
      ["cwm_jax.convert", f"--src={fx['hf']}", f"--dst={w('c2')}", "--to=hf", "--max_shard_gb=nan"],
      [w("c2")],
      ["--max_shard_gb"],
    ),
    "score_token_ids": (
      ["cwm_jax.score", f"--checkpoint={fx['hf']}", "--token_ids=1,4096", f"--output={w('s.npy')}"],
      [w("s.npy")],
      ["--token_ids", "[4096]"],
    ),
    "evaluate_max_programs": (
      ["cwm_jax.evaluate", f"--checkpoint={fx['hf']}", "--max_programs=0"],
      [],
      ["max_programs=0"],
    ),
    "predict_trace_no_program": (
      ["cwm_jax.predict_trace", f"--checkpoint={fx['hf']}", "/no/such/prog.py:f"],
      [],
      ["/no/such/prog.py"],
    ),
    "plan_seq_len_0": (
      ["cwm_jax.plan", "--preset=tiny", "--seq_len=0"],
      [],
      ["--seq_len=0", ">= 1"],
    ),
    "plan_too_many_devices": (
      ["cwm_jax.plan", f"--config={SMOKE}", "--devices=100000000"],
      [],
      ["--devices=100000000", "--topology"],
    ),
  }
  corrupt = {  # checkpoint -> the file the error must name
    "hf_truncated": "model-00001-of-00001.safetensors",
    "hf_empty": "safetensors",
    "hf_header": "header length",
    "hf_config": "config.json",
    "orbax_truncated": "0/state",
    "orbax_missing": "_METADATA",
    "orbax_no_item": "meta/metadata",
    "orbax_meta": "meta/metadata",
    "dcp_metadata": ".metadata",
    "dcp_truncated": ".distcp",
  }
  for name, names in corrupt.items():
    cases[f"score_{name}"] = (
      [
        "cwm_jax.score",
        f"--checkpoint={fx[name]}",
        "--token_ids=1,2,3",
        f"--output={w(name + '.npy')}",
      ],
      [w(name + ".npy")],
      [fx[name], names],
    )
  for name in ("hf_truncated", "orbax_truncated", "dcp_metadata"):
    cases[f"convert_{name}"] = (
      ["cwm_jax.convert", f"--src={fx[name]}", f"--dst={w(name)}", "--to=hf"],
      [w(name)],
      [fx[name], corrupt[name]],
    )
  return {k: (v[0], v[2], v[1]) for k, v in cases.items()}


def _tree(path) -> dict[str, tuple[int, int]]:
  return {
    os.path.join(r, n): (
      os.path.getsize(os.path.join(r, n)),
      os.stat(os.path.join(r, n)).st_mtime_ns,
    )
    for r, _, ns in os.walk(path)
    for n in ns
  }


# Reads [[argv, cwd], ...] on stdin; forks one child per case (4 at a time) that runs
# `python -m argv[0] argv[1:]` via runpy with stdout/stderr in files; prints
# [[exit code, stdout, stderr], ...] as JSON.
RUNNER = r"""
import json, os, runpy, sys, traceback
import grain, jax, ml_collections, numpy, optax, orbax.checkpoint, tensorstore  # noqa
from flax import nnx  # noqa

def child(argv, cwd, out, err):
  os.chdir(cwd)
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  code = 0
  try:
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)

cases, base = json.load(sys.stdin), sys.argv[1]
todo, running, results = list(enumerate(cases)), {}, {}
while todo or running:
  while todo and len(running) < 4:
    i, (argv, cwd) = todo.pop(0)
    files = (f"{base}/{i}.out", f"{base}/{i}.err")
    pid = os.fork()
    if pid == 0:
      child(argv, cwd, *files)
    running[pid] = (i, files)
  pid, status = os.wait()
  i, files = running.pop(pid)
  results[i] = [os.waitstatus_to_exitcode(status), *(open(f).read() for f in files)]
print(json.dumps([results[i] for i in range(len(cases))]))
"""


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return env


def _run_all(argvs, cwd, logs) -> list[subprocess.CompletedProcess]:
  p = subprocess.run(
    [sys.executable, "-c", RUNNER, logs],
    input=json.dumps([[a, cwd] for a in argvs]),
    capture_output=True,
    text=True,
    env=_env(),
    timeout=900,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return [
    subprocess.CompletedProcess(a, rc, out, err)
    for a, (rc, out, err) in zip(argvs, json.loads(p.stdout))
  ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  fx = _fixtures(tmp_path_factory.mktemp("fx"))
  out = str(tmp_path_factory.mktemp("out"))
  cases = _cases(fx, out)
  before = _tree(fx["dir"])
  done = dict(
    zip(cases, _run_all([c[0] for c in cases.values()], out, str(tmp_path_factory.mktemp("logs"))))
  )
  return cases, done, before, _tree(fx["dir"]), out


def _names():
  return sorted(_cases(collections.defaultdict(str), "/out"))


@pytest.mark.parametrize("name", _names())
def test_bad_input_exits_2_with_one_line(results, name):
  cases, done, _, _, _ = results
  _, wants, absent = cases[name]
  p = done[name]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  for want in wants:
    assert want in lines[0], (want, lines[0])
  for path in absent:
    assert not os.path.exists(path), f"{name} created {path}"


def test_forked_run_equals_python_m(results):
  cases, done, _, _, out = results
  for name in ("score_hf_truncated", "train_nan_lr"):
    p = subprocess.run(
      [sys.executable, "-m", *cases[name][0]],
      capture_output=True,
      text=True,
      cwd=out,
      env=_env(),
      timeout=600,
    )
    assert (p.returncode, p.stderr) == (done[name].returncode, done[name].stderr)


def test_inputs_unchanged_and_no_partial_output(results):
  _, _, before, after, out = results
  assert before == after  # no checkpoint, config or program file was touched
  assert not [n for n in os.listdir(out) if ".partial-" in n or n.startswith("t")]
