"""Standard code benchmarks from local files: every reference answer of each published format
scores 1.0 and wrong answers 0.0, in the sandbox; pass@k is the unbiased estimator; the
`evaluate --suite` program prints counts and writes per-sample JSONL.

References: the Python interpreter (the data's canonical solutions run for real in the
sandbox) and math.comb for pass@k. The data files are written here, in each benchmark's
published JSONL format (no downloads).
"""

import base64
import json
import math
import os
import subprocess
import sys
import zlib

import pytest

from cwm_jax.base import ConfigError
from cwm_jax.infer import benchmarks as bm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HUMANEVAL = [
  {
    "task_id": "HumanEval/0",
    "entry_point": "has_close_elements",
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], "
    'threshold: float) -> bool:\n    """ Check if in given list of numbers, are any '
    'two numbers closer to each other than\n    given threshold.\n    """\n',
    "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in "
    "enumerate(numbers):\n            if idx != idx2:\n                "
    "distance = abs(elem - elem2)\n                if distance < "
    "threshold:\n                    return True\n\n    return False\n",
    "test": "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef "
    "check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == "
    "True\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n    "
    "assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n    assert "
    "candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n\n",
  },
  {
    "task_id": "HumanEval/2",
    "entry_point": "truncate_number",
    "prompt": '\n\ndef truncate_number(number: float) -> float:\n    """ Return the decimal '
    'part of the number.\n    >>> truncate_number(3.5)\n    0.5\n    """\n',
    "canonical_solution": "    return number % 1.0\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(3.5) == 0.5\n"
    "    assert abs(candidate(1.33) - 0.33) < 1e-6\n    assert abs(candidate(123.456) - "
    "0.456) < 1e-6\n",
  },
  {
    "task_id": "HumanEval/12",
    "entry_point": "longest",
    "prompt": "from typing import List, Optional\n\n\ndef longest(strings: List[str]) -> "
    'Optional[str]:\n    """ Return the longest string, the first one in case of '
    'a tie; None for an empty list. """\n',
    "canonical_solution": "    if not strings:\n        return None\n\n    maxlen = max(len(x) "
    "for x in strings)\n    for s in strings:\n        if len(s) == "
    "maxlen:\n            return s\n",
    "test": "\n\ndef check(candidate):\n    assert candidate([]) == None\n    assert "
    "candidate(['x', 'y', 'z']) == 'x'\n    assert candidate(['x', 'yyy', 'zzzz', 'www', "
    "'kkkk', 'abc']) == 'zzzz'\n",
  },
]
HUMANEVAL_WRONG = {
  "HumanEval/0": [
    "    return False\n",
    "    return True\n",
    "    import sys\n    sys.exit(0)\n",
    "    while True:\n        pass\n",
    "    return (\n",
  ],
  "HumanEval/2": ["    return number - int(number) + 1\n", "    return int(number)\n"],
  "HumanEval/12": [
    "    return max(strings, key=len) if strings else ''\n",
    "    return sorted(strings, key=len)[-1]\n",
  ],
}
MBPP = [
  {
    "task_id": 2,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(test_tup1, test_tup2):\n  res = "
    "tuple(set(test_tup1) & set(test_tup2))\n  return (res) ",
    "test_list": [
      "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
      "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
      "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
  },
  {
    "task_id": 3,
    "text": "Write a python function to identify non-prime numbers.",
    "code": "import math\ndef is_not_prime(n):\n    result = False\n    for i in "
    "range(2,int(math.sqrt(n)) + 1):\n        if n % i == 0:\n            result = True\n"
    "    return result",
    "test_list": [
      "assert is_not_prime(2) == False",
      "assert is_not_prime(10) == True",
      "assert is_not_prime(35) == True",
      "assert is_not_prime(37) == False",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
  },
]
MBPP_WRONG = {
  "2": [
    "def similar_elements(a, b):\n  return tuple(set(a) | set(b))",
    "def other_name(a, b):\n  return tuple(set(a) & set(b))",
  ],
  "3": [
    "def is_not_prime(n):\n    return n % 2 == 0",
    "```python\ndef is_not_prime(n):\n    return True\n```",
  ],
}
CRUXEVAL = [
  {
    "id": "sample_0",
    "code": "def f(nums):\n    output = []\n    for n in nums:\n        "
    "output.append((nums.count(n), n))\n    output.sort(reverse=True)\n    return output",
    "input": "[1, 1, 3, 1, 3, 1]",
    "output": "[(4, 1), (4, 1), (4, 1), (4, 1), (2, 3), (2, 3)]",
  },
  {
    "id": "sample_1",
    "code": "def f(a, b, c):\n    result = {}\n    for d in a, b, c:\n        "
    "result.update(dict.fromkeys(d))\n    return result",
    "input": "(1, ), (1, ), (1, 2)",
    "output": "{1: None, 2: None}",
  },
  {
    "id": "sample_2",
    "code": "def f(text):\n    new_text = list(text)\n    for i in '+':\n"
    "        if i in new_text:\n            new_text.remove(i)\n    return ''.join(new_text)",
    "input": "'hbtofdeiequ'",
    "output": "'hbtofdeiequ'",
  },
]
CRUX_O_WRONG = {
  "sample_0": ["[(4, 1), (2, 3)]", "f([1, 1, 3, 1, 3, 1])", "[(4, 1"],
  "sample_1": ["{1: None}", "{2: None, 1: 0}"],
  "sample_2": ["'hbtofdeiequ+'", "assert f('hbtofdeiequ') == 'x'"],
}
CRUX_I_WRONG = {
  "sample_0": ["f([1, 3])", "[1, 1, 3, 1, 3, 1]"],
  "sample_1": ["f((1,), (2,), (3,))"],
  "sample_2": ["f('hbtofdeiequ+x')", "assert f('x') == 'hbtofdeiequ'"],
}


def _lcb_cases(cases):
  return json.dumps([{"input": i, "output": o, "testtype": "stdin"} for i, o in cases])


LIVECODEBENCH = [
  {
    "question_id": "abc001_a",
    "question_content": "Read two integers A and B and print A+B.",
    "public_test_cases": _lcb_cases([("1 2\n", "3\n")]),
    "private_test_cases": base64.b64encode(
      zlib.compress(_lcb_cases([("100 -7\n", "93\n"), ("0 0\n", "0\n")]).encode())
    ).decode(),
    "solution": "a, b = map(int, input().split())\nprint(a + b)\n",
  },
  {
    "question_id": "abc002_b",
    "question_content": "Read N then N words; print them sorted, one a line.",
    "public_test_cases": _lcb_cases([("3\npear\napple\nfig\n", "apple\nfig\npear\n")]),
    "private_test_cases": _lcb_cases([("1\nz\n", "z")]),
    "solution": "```python\nimport sys\nn, *w = sys.stdin.read().split()\n"
    "print('\\n'.join(sorted(w)))\n```",
  },
]
LCB_WRONG = {
  "abc001_a": [
    "a, b = map(int, input().split())\nprint(a - b)\n",
    "print(3)\n",
    "import time\nwhile True: pass\n",
  ],
  "abc002_b": ["import sys\nprint(sys.stdin.read())\n"],
}


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


SUITES = {
  "humaneval": (HUMANEVAL, HUMANEVAL_WRONG),
  "mbpp": (MBPP, MBPP_WRONG),
  "cruxeval_o": (CRUXEVAL, CRUX_O_WRONG),
  "cruxeval_i": (CRUXEVAL, CRUX_I_WRONG),
  "livecodebench": (LIVECODEBENCH, LCB_WRONG),
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_references_pass_and_wrong_answers_fail(suite, tmp_path):
  records, wrong = SUITES[suite]
  tasks = bm.load_tasks(suite, _write(tmp_path / "data.jsonl", records))
  assert [t.bad for t in tasks] == [""] * len(records)
  summary, rows = bm.score(suite, tasks, bm.references(tasks))
  assert summary["pass@1"] == 1.0, rows
  assert summary["scored_tasks"] == summary["passed"] == len(records)
  summary, rows = bm.score(suite, tasks, wrong, ks=(1, 2))
  assert summary["passed"] == 0 and summary["pass@1"] == 0.0, rows
  assert summary["samples"] == sum(map(len, wrong.values()))
  assert summary["pass@2_tasks"] == sum(len(v) >= 2 for v in wrong.values())


def test_failure_statuses_say_why(tmp_path):
  tasks = bm.load_tasks("humaneval", _write(tmp_path / "he.jsonl", HUMANEVAL))
  _, rows = bm.score("humaneval", tasks[:1], {"HumanEval/0": HUMANEVAL_WRONG["HumanEval/0"]})
  assert [r["status"] for r in rows] == ["failed", "failed", "failed", "timeout", "syntax"]


def test_pass_at_k_is_the_unbiased_estimator():
  for n in range(1, 12):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert bm.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
  tasks = [bm.Task("a", "", "", {}), bm.Task("b", "", "", {})]
  summary, _ = bm.score("mbpp", tasks, {}, ks=(1,))
  assert "pass@1" not in summary and summary["unscored"] == ["pass@1: no task has 1 samples"]


def test_prediction_answers_and_truncation():
  task = bm.Task("x", "", "", {})
  assert bm.output_prediction("[ANSWER]assert f(1) == [1, 2][/ANSWER]", task) == "[1, 2]"
  assert bm.output_prediction("f(1)", task) is None
  assert bm.input_prediction("assert f('a', 2) == 'aa'", task) == "f('a', 2)"
  assert bm.truncate("cruxeval_i", "'a', 2) == 'aa'\nmore") == "f('a', 2)"
  assert bm.truncate("humaneval", "    return 1\n\ndef other():\n") == "    return 1\n"
  assert bm.truncate("cruxeval_o", "[1, 2]\nassert") == "[1, 2]"


def test_bad_files_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="fields .*entry_point"):
    bm.load_tasks("humaneval", _write(tmp_path / "a.jsonl", [{"task_id": "x", "prompt": ""}]))
  with pytest.raises(ConfigError, match="one of"):
    bm.load_tasks("gsm8k", _write(tmp_path / "b.jsonl", HUMANEVAL))
  bad = dict(LIVECODEBENCH[0], private_test_cases="gASVpickle")
  with pytest.raises(ConfigError, match="pickled test cases are not read"):
    bm.load_tasks("livecodebench", _write(tmp_path / "c.jsonl", [bad]))
  functional = dict(
    LIVECODEBENCH[0],
    private_test_cases=json.dumps([{"input": "1", "output": "2", "testtype": "functional"}]),
  )
  (task,) = bm.load_tasks("livecodebench", _write(tmp_path / "d.jsonl", [functional]))
  assert "not run here" in task.bad
  summary, _ = bm.score("livecodebench", [task], {task.task_id: ["print(1)"]})
  assert summary["bad_tasks"] == 1 and summary["scored_tasks"] == 0
  assert "pass@1" not in summary


def _evaluate(*args):
  return subprocess.run(
    [sys.executable, "-m", "cwm_jax.evaluate", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_evaluate_scores_samples_file(tmp_path):
  data = _write(tmp_path / "he.jsonl", HUMANEVAL)
  samples = [{"task_id": t["task_id"], "completion": t["canonical_solution"]} for t in HUMANEVAL]
  samples += [{"task_id": k, "completion": c} for k, v in HUMANEVAL_WRONG.items() for c in v[:1]]
  results = str(tmp_path / "out.jsonl")
  proc = _evaluate(
    "--suite",
    "humaneval",
    "--data",
    data,
    "--samples",
    _write(tmp_path / "samples.jsonl", samples),
    "--k",
    "1,2",
    "--results",
    results,
  )
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert (out["tasks"], out["samples"], out["passed"]) == (3, 6, 3)
  assert out["pass@1"] == pytest.approx(0.5) and out["pass@2"] == pytest.approx(1.0)
  rows = [json.loads(line) for line in open(results)]
  assert len(rows) == 6 and sum(r["passed"] for r in rows) == 3
  proc = _evaluate("--suite", "humaneval", "--data", data)
  assert proc.returncode == 2 and "exactly one of" in proc.stderr


def test_generated_completions_are_scored(tmp_path):
  """The generation path end to end on a tiny random model with the project's vocabulary:
  every task gets its completions, each scored (a random model passes nothing)."""
  import jax
  import numpy as np

  from cwm_jax.checkpoint import manager
  from cwm_jax.data.tokenizer import Tokenizer
  from cwm_jax.model import tiny
  from cwm_jax.model.transformer import model_from_params

  tok = Tokenizer.default()
  cfg = tiny(n_layers=2, vocab_size=tok.vocab_size, dim=32, ffn_dim=64, head_dim=8)
  shapes = manager.params_target(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
  tasks = bm.load_tasks("cruxeval_o", _write(tmp_path / "c.jsonl", CRUXEVAL))
  samples = bm.generate(
    model_from_params(cfg, params),
    tok,
    "cruxeval_o",
    tasks,
    n=2,
    temperature=1.0,
    max_new_tokens=6,
    batch_size=4,
  )
  assert sorted(samples) == sorted(t.task_id for t in tasks)
  assert all(len(v) == 2 and all("\n" not in c for c in v) for v in samples.values())
  summary, rows = bm.score("cruxeval_o", tasks, samples, ks=(1, 2))
  assert summary["samples"] == 6 and len(rows) == 6 and "pass@2" in summary
