"""The standard code benchmarks in-loop: `suites.every` samples each suite's tasks with the
current params during a tiny training run and scores them in the sandbox; the metrics land in
metrics.jsonl at those steps, the per-sample rows in WORKDIR/suites/SUITE/step_N.jsonl, and
the scores equal what `python -m cwm_jax.evaluate --suite ... --samples` (an independent path)
gives on the same completions. Bad `suites` fields exit 2 before anything compiles.

The data files are written here in the benchmarks' published formats. A random model passes
nothing, so two HumanEval-format prompts end in an open comment: whatever completion stays
on that line is a comment, and the function the prompt defines decides the verdict (right
in one task, wrong in the other), so the scores mix passes and failures.
"""

import json
import os
import subprocess
import sys

import localhost
import pytest

from cwm_jax.base import ConfigError
from cwm_jax.infer import benchmarks as bm
from cwm_jax.recipe import trainers
from cwm_jax.rl import trainer as rl_trainer
from cwm_jax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HUMANEVAL = [
  {
    "task_id": "Tiny/add",
    "prompt": "def add(a, b):\n    return a + b\n# ",
    "canonical_solution": "",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
    "entry_point": "add",
  },
  {
    "task_id": "Tiny/sub",
    "prompt": "def sub(a, b):\n    return a + b\n# ",
    "canonical_solution": "",
    "test": "def check(candidate):\n    assert candidate(3, 1) == 2\n",
    "entry_point": "sub",
  },
  {
    "task_id": "Tiny/neg",
    "prompt": 'def neg(x):\n    """Return -x."""\n',
    "canonical_solution": "    return -x\n",
    "test": "def check(candidate):\n    assert candidate(2) == -2\n",
    "entry_point": "neg",
  },
]
CRUXEVAL = [
  {"id": "sample_0", "code": "def f(x):\n    return x * 2", "input": "3", "output": "6"},
  {"id": "sample_1", "code": "def f(s):\n    return s[::-1]", "input": "'ab'", "output": "'ba'"},
]
N, KS = 2, "1,2"


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _config(tmp_path, **suites):
  c = config_lib.base_config()
  c.total_steps, c.checkpoint_every, c.seq_len, c.batch_size = 4, 0, 32, 8  # 8 test devices
  c.metrics.tensorboard = False
  c.optimizer.decay_steps = 4
  c.model.overrides.update(vocab_size=4352, n_layers=2)  # the shipped tokenizer's vocab
  c.compiler_options.xla_backend_optimization_level = 0
  c.suites.update(
    every=2,
    humaneval=_write(tmp_path / "humaneval.jsonl", HUMANEVAL),
    cruxeval_o=_write(tmp_path / "cruxeval.jsonl", CRUXEVAL),
    n=N,
    k=KS,
    temperature=1.0,
    max_new_tokens=8,
  )
  c.suites.update(suites)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step run evaluating both suites every 2 steps on all 8 devices (rows split over
  the fsdp axis: 6 and 4 rows per suite padded to 8)."""
  tmp = tmp_path_factory.mktemp("suites")
  c = _config(tmp)
  workdir = tmp / "run"
  out = trainers.TRAINERS["lm"].run(c, str(workdir), [])
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return c, workdir, out, records


def _evals(records, suite):
  return [r for r in records if f"eval/{suite}/samples" in r]


def test_metrics_at_the_steps_with_counts_of_the_items(run):
  _, _, out, records = run
  assert out["step"] == 4
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  for suite, items in (("humaneval", HUMANEVAL), ("cruxeval_o", CRUXEVAL)):
    evals = _evals(records, suite)
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
      m = {k.split("/", 2)[2]: v for k, v in r.items() if k.startswith(f"eval/{suite}/")}
      assert m["tasks"] == m["scored_tasks"] == len(items)
      assert m["samples"] == N * len(items) and m["bad_tasks"] == 0
      assert m["pass@1_tasks"] == m["pass@2_tasks"] == len(items)
      assert 0 <= m["pass@1"] <= m["pass@2"] <= 1
  assert all(r["eval/cruxeval_o/passed"] == 0 for r in _evals(records, "cruxeval_o"))


def test_per_sample_results_are_written(run):
  _, workdir, _, _ = run
  for suite, items in (("humaneval", HUMANEVAL), ("cruxeval_o", CRUXEVAL)):
    assert sorted(os.listdir(workdir / "suites" / suite)) == ["step_2.jsonl", "step_4.jsonl"]
    rows = [json.loads(line) for line in open(workdir / "suites" / suite / "step_4.jsonl")]
    ids = [str(t.get("task_id", t.get("id"))) for t in items]
    assert [(r["task_id"], r["sample"]) for r in rows] == [(i, s) for i in ids for s in range(N)]
    assert all(isinstance(r["completion"], str) and r["status"] for r in rows)


@pytest.mark.parametrize("suite", ["humaneval", "cruxeval_o"])
def test_scores_equal_the_evaluate_program_on_the_same_completions(run, suite, tmp_path):
  c, workdir, _, records = run
  rows = [json.loads(line) for line in open(workdir / "suites" / suite / "step_4.jsonl")]
  if suite == "humaneval":  # the open-comment prompts: some samples pass, some fail
    assert {r["task_id"] for r in rows if r["passed"]} == {"Tiny/add"}, rows
  samples = _write(
    tmp_path / "samples.jsonl",
    [{"task_id": r["task_id"], "completion": r["completion"]} for r in rows],
  )
  results = tmp_path / "results.jsonl"
  proc = subprocess.run(
    [sys.executable, "-m", "cwm_jax.evaluate", "--suite", suite, "--data", c.suites[suite]]
    + ["--samples", samples, "--k", KS, "--results", str(results)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = bm.suite_metrics(json.loads(proc.stdout))
  (got,) = [r for r in _evals(records, suite) if r["step"] == 4]
  assert {k: v for k, v in got.items() if k.startswith(f"eval/{suite}/")} == want
  keys = ("task_id", "sample", "passed", "status")
  assert [[r[k] for k in keys] for r in map(json.loads, open(results))] == [
    [r[k] for k in keys] for r in rows
  ]


@pytest.mark.parametrize(
  "update, match",
  [
    (dict(humaneval="/no/such/file.jsonl"), "suites.humaneval file '/no/such/file.jsonl' not"),
    (dict(n=1), "pass@2 needs at least 2 samples per task"),
    (dict(temperature=0.0), "greedy completions would all be the same"),
    (dict(k="1,x"), "suites.k='1,x' must be positive integers"),
    (dict(every=-1), "suites.every=-1 must be an integer >= 0"),
    (dict(every=0), "suites.humaneval, suites.cruxeval_o set but suites.every=0"),
    (dict(max_new_tokens=5000), "exceeds the model's max_seq_len=4096"),
    (dict(humaneval="", cruxeval_o="", every=3), "no suite names a data file"),
  ],
)
def test_bad_suites_config_is_a_config_error(tmp_path, update, match):
  c = _config(tmp_path, **update)
  with pytest.raises(ConfigError, match=match):
    trainers.TRAINERS["lm"].validate(c)


def test_unknown_field_malformed_file_and_small_vocab_are_config_errors(tmp_path):
  c = _config(tmp_path)
  c.suites.humanevl = "x.jsonl"
  with pytest.raises(ConfigError, match=r"suites: unknown fields \['humanevl'\]"):
    trainers.TRAINERS["lm"].validate(c)
  c = _config(tmp_path, mbpp=_write(tmp_path / "mbpp.jsonl", HUMANEVAL))
  with pytest.raises(
    ConfigError, match=r"suites.mbpp: .*mbpp.jsonl:1: fields \['text', 'code'\] missing"
  ):
    trainers.TRAINERS["lm"].validate(c)
  c = _config(tmp_path)
  c.model.overrides.vocab_size = 512
  with pytest.raises(ConfigError, match="tokenizer has 4352 ids but the model only 512"):
    trainers.TRAINERS["lm"].validate(c)
  c = _config(tmp_path)
  c.rl = rl_trainer.rl_config()
  c.rl.max_new_tokens = 8
  rl_trainer.validate(c)  # valid but for the suites section, which the RL trainer checks too
  c.suites.n = 0
  with pytest.raises(ConfigError, match="suites.n=0 must be an integer >= 1"):
    trainers.TRAINERS["rl"].validate(c)


def test_base_config_section_is_the_suite_config_defaults():
  assert bm.SuiteConfig.from_mapping(config_lib.base_config().suites) == bm.SuiteConfig()
  assert trainers.suite_eval(config_lib.base_config()) is None


def test_cli_bad_suites_config_exits_2_before_compiling(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    JAX_LOG_COMPILES="1",
  )
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [sys.executable, "-m", "cwm_jax.train", "--config", os.path.join(ROOT, "configs/smoke.py")]
    + ["--workdir", str(workdir), "--config.suites.every=2"]
    + [f"--config.suites.humaneval={tmp_path / 'missing.jsonl'}"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "suites.humaneval file" in proc.stderr and "not found" in proc.stderr, proc.stderr
  assert "Compiling" not in proc.stderr and not (workdir / "checkpoints").exists()


def test_verdicts_split_over_processes_equal_one_process(tmp_path, monkeypatch):
  """Two processes each judge every other sample and gather the verdicts: every process
  gets what one process judging them all gets, in the same order."""
  tasks = bm.load_tasks("humaneval", _write(tmp_path / "he.jsonl", HUMANEVAL))
  samples = {
    "Tiny/add": ["x", "y\nz("],
    "Tiny/sub": ["x"],
    "Tiny/neg": ["    return -x\n", "    return x\n"],
  }
  want = bm.score("humaneval", tasks, samples, (1, 2))
  parts = {}

  def as_process(index):
    monkeypatch.setattr(bm.jax, "process_count", lambda: 2)
    monkeypatch.setattr(bm.jax, "process_index", lambda: index)

    def gather(value):
      parts[index] = value
      return [parts.get(0, [[False, "not yet judged", ""]] * 3), parts[1]]

    monkeypatch.setattr(bm, "_allgather_json", gather)
    return bm.score("humaneval", tasks, samples, (1, 2), shared=True)

  as_process(1)  # records its share (process 0's is not known yet)
  assert len(parts[1]) == 2  # samples 1 and 3 of the 5
  assert as_process(0) == want
  assert want[0]["passed"] == 2 and want[0]["pass@1"] == pytest.approx((0.5 + 0 + 0.5) / 3)


def test_two_processes_sample_and_judge_together(tmp_path):
  """2 processes x 4 devices (gloo on localhost), a 2-step run evaluating HumanEval at step 2:
  both take part in every sampling program and judge half of the samples each; both log the
  same metrics with counts equal to the items, and process 0 writes all rows."""
  c = _config(tmp_path)
  suites = {k: c.suites[k] for k in ("every", "humaneval", "n", "k", "max_new_tokens")}
  suites.update(temperature=c.suites.temperature)
  out = tmp_path / "run"
  argv = [os.path.join(ROOT, "tests", "multiprocess_suites.py"), str(out), "2", json.dumps(suites)]
  localhost.run(argv, processes=2, devices=4, timeout=900)
  first, second = (json.load(open(f"{out}.{i}.json")) for i in range(2))
  assert first == second
  (ev,) = _evals(first, "humaneval")
  assert ev["step"] == 2 and ev["eval/humaneval/samples"] == N * len(HUMANEVAL)
  assert ev["eval/humaneval/scored_tasks"] == len(HUMANEVAL) and "eval/humaneval/pass@2" in ev
  rows = [json.loads(line) for line in open(out / "suites" / "humaneval" / "step_2.jsonl")]
  assert len(rows) == N * len(HUMANEVAL)
  assert sum(r["passed"] for r in rows) == ev["eval/humaneval/passed"]
  assert {r["task_id"] for r in rows if r["passed"]} == {"Tiny/add"}, rows
