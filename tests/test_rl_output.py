"""Output-prediction RL tasks (rl.output_tasks): generated programs, values from the sandbox,
the CRUXEval-O verifier, disjoint splits, determinism."""

import json
import subprocess
import sys

import pytest

from cwm_jax.base import ConfigError
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.rl import datasets, output_tasks, tasks

TOK = Tokenizer.default()


def _interpreter_values(records: list[dict]) -> list:
  """Each call's value as a separate, plain Python interpreter computes it."""
  script = (
    "import json, sys\n"
    "out = []\n"
    "for code, arg in json.load(sys.stdin):\n"
    "    ns = {}\n"
    "    exec(code, ns)\n"
    "    out.append(repr(eval('f(' + arg + ')', ns)))\n"
    "print(json.dumps(out))\n"
  )
  stdin = json.dumps([(r["code"], r["input"]) for r in records])
  run = subprocess.run(
    [sys.executable, "-I", "-c", script], input=stdin, capture_output=True, text=True, check=True
  )
  return json.loads(run.stdout)


def _wrong(value: str) -> str:
  """A literal that differs from `value` under ==."""
  return "'not the value'" if value != "'not the value'" else "12345"


def test_reference_values_are_the_interpreters_and_the_verifier_scores_them():
  records = output_tasks.records(24, "train", seed=3)
  assert len(records) == 24
  assert [r["output"] for r in records] == _interpreter_values(records)
  for record in records[:8]:
    task = datasets.task_from_record(record, TOK)
    assert task.kind == "output"
    reference = TOK.decode(task.reference_ids[:-1])  # the answer without <|eot_id|>
    assert reference == record["output"]
    assert task.verify(reference).value == 1.0
    assert task.verify(f"[ANSWER]{reference}[/ANSWER]").passed  # CRUXEval's answer tags
    wrong = task.verify(_wrong(record["output"]))
    assert wrong.value == -1.0 and wrong.status == "wrong"


def test_only_a_literal_is_a_prediction():
  record = {"id": "o", "kind": "output", "code": "def f(x):\n    return x + 3\n", "input": "4"}
  task = datasets.task_from_record(record, TOK)
  assert task.verify("7").passed and task.reference_ids == ()
  assert task.verify("assert f(4) == 7").passed and task.verify("7  # seven").passed
  # Each of these evaluates to 7 in the program, but none predicts it.
  for hack in ("f(4)", "[*map(f, [4])][0]", "4 + 3", "x", ""):
    verdict = task.verify(hack)
    assert verdict.value == -1.0 and verdict.status == "no_answer", hack
  # Equal under == but of another type: no constant answer passes booleans and counts alike.
  assert task.verify("7.0").status == "wrong"
  boolean = {"id": "p", "kind": "output", "code": "def f(x):\n    return x > 3\n", "input": "1"}
  task = datasets.task_from_record(boolean, TOK)
  assert task.verify("False").passed and not task.verify("0").passed
  # A bare tuple is one literal, judged as such (not `assert ... == 'x', 1`, an assert message).
  assert task.verify("'x', 1").status == "wrong"


def test_splits_are_disjoint_programs_and_generation_is_deterministic():
  train = output_tasks.programs(400, "train", seed=0)
  held = output_tasks.programs(100, "held_out", seed=0)
  assert len(set(train)) == 400 and len(set(held)) == 100
  assert not {s for s, _ in train} & {s for s, _ in held}
  assert all(output_tasks.split_of(s) == "held_out" for s, _ in held)
  assert output_tasks.programs(100, "held_out", seed=0) == held
  assert output_tasks.programs(100, "held_out", seed=1) != held
  # Integer, string and list programs are in both splits.
  families = lambda pairs: {"int" if arg[0].isdigit() else arg[0] for _, arg in pairs}
  assert families(train) == families(held) == {"int", "'", "["}
  with pytest.raises(ConfigError):
    output_tasks.programs(1, "test")


def test_bad_output_records_are_bad_tasks_and_the_embedded_kind_builds():
  bad = {"id": "b", "kind": "output", "code": "def f(:\n", "input": "1"}
  with pytest.raises(datasets.BadTask) as e:
    datasets.task_from_record(bad, TOK)
  assert e.value.reason == "bad_code"
  with pytest.raises(datasets.BadTask):
    datasets.task_from_record({"id": "b", "kind": "output", "code": "def f(x): pass"}, TOK)
  built = tasks.build_tasks("output", TOK, max_prompt_len=96)
  assert built and {t.kind for t in built} == {"output"}
  assert all(t.name.startswith("output/train/") for t in built)
