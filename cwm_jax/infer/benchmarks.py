"""The standard code benchmarks from local files, scored in the sandbox.

Suites and the published JSONL formats they read (one JSON object a line):

  humaneval      {task_id, prompt, canonical_solution, test, entry_point}: the program is
                 prompt + completion (human-eval's own rule), judged by `test` + `check(ENTRY)`.
  mbpp           {task_id, text, code, test_list[, test_setup_code]}: the program is the
                 completion's code (its first fenced block, if any), judged by the asserts.
  cruxeval_o     {id, code, input, output}: the completion is the predicted output, judged by
                 `assert f(INPUT) == PREDICTION` (a prediction that calls `f` is wrong).
  cruxeval_i     {id, code, input, output}: the completion is the predicted call `f(...)`,
                 judged by `assert PREDICTION == OUTPUT`.
  livecodebench  {question_id, question_content, public_test_cases, private_test_cases
                 [, starter_code]}: test cases `[{input, output, testtype: 'stdin'}]` as a list,
                 a JSON string, or base64 of zlib-compressed JSON; the program (the completion's
                 code) must print each expected output given its input on stdin.

Every program runs in the sandbox (`cwm_jax.data.traces`): assert-style tests through
`harness.run_tests`, where the caller evaluates each assert on values the program computed
(the code suites and both prediction suites: executing the predicted assertion, as the
benchmarks' own harnesses do, with the verdict outside the program), stdin/stdout tests through
`sandbox.run_python`. Tests the harness cannot judge make a bad task: counted and reported,
never scored.

Scores are pass@k with the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k),
averaged over the tasks with at least k samples; a run reports how many tasks, samples and
passes it scored, and a metric over no task is left out with the reason, never reported as 0.
"""

from __future__ import annotations

import ast
import base64
import collections
import concurrent.futures
import dataclasses
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.data.traces import harness, sandbox
from cwm_jax.infer import sampler
from cwm_jax.rl import rewards

SUITES = ("humaneval", "mbpp", "cruxeval_o", "cruxeval_i", "livecodebench")
# Where a completion of a code prompt ends when the model writes on (human-eval's and
# MBPP's usual stop sequences: the next top-level statement).
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
_ANSWER_TAG = re.compile(r"\[ANSWER\](.*?)(?:\[/ANSWER\]|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark item: the prompt a model continues, the reference completion (what a
  correct model would write), and what the scorer needs."""

  task_id: str
  prompt: str
  reference: str
  record: dict
  bad: str = ""  # why the task cannot be judged ('' when it can)


@dataclasses.dataclass(frozen=True)
class Verdict:
  passed: bool
  status: str  # 'pass', or why not: 'failed', 'syntax', 'timeout', 'memory', 'bad_answer', ...
  message: str = ""


def _fields(record: dict, where: str, names: tuple[str, ...], types=(str,)) -> None:
  missing = [n for n in names if not isinstance(record.get(n), types)]
  if missing:
    raise ConfigError(
      f"{where}: fields {missing} missing or not {'/'.join(t.__name__ for t in types)}; "
      "is the file in this suite's published format (see docs/evaluation.md)?"
    )


def _decode_cases(value: Any, where: str) -> list[dict]:
  """LiveCodeBench test cases: a list, a JSON string, or base64(zlib(JSON)). The published
  files' pickle layer is not read: unpickling a data file could run code."""
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return []
    try:
      value = json.loads(text)
    except ValueError:
      try:
        value = json.loads(zlib.decompress(base64.b64decode(text, validate=True)))
      except (ValueError, zlib.error):
        raise ConfigError(
          f"{where}: test cases are neither JSON nor base64 of zlib-compressed "
          "JSON (pickled test cases are not read: convert them to JSON)"
        ) from None
  if not isinstance(value, list) or not all(
    isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
    for c in value
  ):
    raise ConfigError(
      f"{where}: test cases must be a list of {{input, output, testtype}} with "
      "string input and output"
    )
  return value


def _humaneval(r: dict, where: str) -> Task:
  _fields(r, where, ("task_id", "prompt", "canonical_solution", "test", "entry_point"))
  return Task(
    r["task_id"], r["prompt"], r["canonical_solution"], r, _bad_tests(_humaneval_tests(r))
  )


def _humaneval_tests(r: dict) -> str:
  return f"{r['test']}\ncheck({r['entry_point']})\n"


def _mbpp(r: dict, where: str) -> Task:
  _fields(r, where, ("text", "code"))
  if not isinstance(r.get("task_id"), (int, str)) or not isinstance(r.get("test_list"), list):
    raise ConfigError(f"{where}: MBPP needs task_id and a test_list of assert strings")
  first = r["test_list"][0] if r["test_list"] else ""
  prompt = f'"""\n{r["text"]}\n{first}\n"""\n'
  return Task(str(r["task_id"]), prompt, r["code"], r, _bad_tests(_mbpp_tests(r)))


def _mbpp_tests(r: dict) -> str:
  return "\n".join([r.get("test_setup_code") or "", *r["test_list"]]) + "\n"


def _cruxeval(output: bool) -> Callable[[dict, str], Task]:
  def load(r: dict, where: str) -> Task:
    _fields(r, where, ("code", "input", "output"))
    task_id = str(r.get("id", r.get("task_id", "")))
    if not task_id:
      raise ConfigError(f"{where}: CRUXEval needs an id")
    if output:
      return Task(
        task_id,
        f"{r['code']}\nassert f({r['input']}) == ",
        r["output"],
        r,
        _bad_tests(f"assert f({r['input']}) == {r['output']}\n"),
      )
    return Task(
      task_id,
      f"{r['code']}\nassert f(",
      f"f({r['input']})",
      r,
      _bad_tests(f"assert f({r['input']}) == {r['output']}\n"),
    )

  return load


def _livecodebench(r: dict, where: str) -> Task:
  _fields(r, where, ("question_content",))
  task_id = str(r.get("question_id", r.get("task_id", "")))
  if not task_id:
    raise ConfigError(f"{where}: LiveCodeBench needs a question_id")
  cases = _decode_cases(r.get("public_test_cases", []), where) + _decode_cases(
    r.get("private_test_cases", []), where
  )
  kinds = sorted({c.get("testtype", "stdin") for c in cases} - {"stdin"})
  bad = (
    f"test types {kinds} are not run here (stdin/stdout tests only)"
    if kinds
    else ""
    if cases
    else "no test cases"
  )
  prompt = (
    f"{r['question_content']}\n\nWrite a Python program that reads the input from "
    "standard input and prints the answer.\n```python\n"
  )
  return Task(task_id, prompt, str(r.get("solution", "")), {**r, "_cases": cases}, bad)


def _bad_tests(tests: str) -> str:
  """'' if the harness can judge `tests` outside the program, else why not."""
  try:
    rewards.check_tests(tests)
  except (harness.BadTests, SyntaxError) as e:
    return f"the tests cannot be judged outside the program: {e}"
  return ""


_LOADERS = {
  "humaneval": _humaneval,
  "mbpp": _mbpp,
  "cruxeval_o": _cruxeval(True),
  "cruxeval_i": _cruxeval(False),
  "livecodebench": _livecodebench,
}


def check_suite(suite: str) -> None:
  if suite not in SUITES:
    raise ConfigError(f"--suite {suite!r} must be one of {', '.join(SUITES)}")


def read_jsonl(path: str, what: str) -> Iterable[tuple[str, dict]]:
  """(where, record) for each non-empty line of a local or gs:// JSONL file."""
  if not storage.isfile(path):
    raise ConfigError(f"{what} file {path!r} not found; pass a JSONL file")
  for n, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ConfigError(f"{path}:{n} is not JSON ({e}); one JSON object a line") from None
    if not isinstance(record, dict):
      raise ConfigError(f"{path}:{n} is not a JSON object")
    yield f"{path}:{n}", record


def load_tasks(suite: str, path: str) -> list[Task]:
  """The tasks of a local (or gs://) JSONL file in `suite`'s published format."""
  check_suite(suite)
  tasks = [_LOADERS[suite](record, where) for where, record in read_jsonl(path, "--data")]
  if not tasks:
    raise ConfigError(f"--data {path} holds no task")
  seen = collections.Counter(t.task_id for t in tasks)
  dupes = sorted(k for k, v in seen.items() if v > 1)
  if dupes:
    raise ConfigError(f"--data {path}: task ids {dupes[:5]} appear more than once")
  return tasks


def read_samples(path: str, tasks: list[Task]) -> dict[str, list[str]]:
  """{task_id: [completion, ...]} from human-eval's sample format (`task_id`, `completion`
  per line); every sample must name a task of the data file."""
  known = {t.task_id for t in tasks}
  out: dict[str, list[str]] = collections.defaultdict(list)
  for where, record in read_jsonl(path, "--samples"):
    task_id, completion = record.get("task_id"), record.get("completion")
    if not isinstance(task_id, (str, int)) or not isinstance(completion, str):
      raise ConfigError(f"{where}: a sample needs task_id and a string completion")
    if str(task_id) not in known:
      raise ConfigError(f"{where}: task_id {task_id!r} is not in the --data file")
    out[str(task_id)].append(completion)
  return dict(out)


def references(tasks: list[Task]) -> dict[str, list[str]]:
  """Each task's reference completion (canonical solution or correct answer) as its one
  sample: scoring these checks the data file and the sandbox (all should pass)."""
  return {t.task_id: [t.reference] for t in tasks if t.reference}


def _strip_answer(text: str) -> str:
  """A prediction without CRUXEval's `[ANSWER]` tags and code fences."""
  match = _ANSWER_TAG.search(text)
  text = match.group(1) if match else text
  return rewards.extract_code(text).strip() if "```" in text else text.strip()


def _expression(text: str) -> ast.expr | None:
  try:
    return ast.parse(text, mode="eval").body
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return None


def _calls_f(node: ast.AST) -> bool:
  return any(
    isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "f"
    for n in ast.walk(node)
  )


def output_prediction(completion: str, task: Task) -> str | None:
  """The predicted output expression (`assert f(X) == Y` and `Y` alike), or None when it is
  no expression or calls `f` (which would not predict anything)."""
  text = _strip_answer(completion)
  if text.startswith("assert "):
    text = text[len("assert ") :]
  node = _expression(text)
  if (
    isinstance(node, ast.Compare)
    and len(node.ops) == 1
    and isinstance(node.ops[0], ast.Eq)
    and _calls_f(node.left)
  ):
    text, node = ast.unparse(node.comparators[0]), node.comparators[0]
  if node is None or _calls_f(node):
    return None
  return text


def input_prediction(completion: str, task: Task) -> str | None:
  """The predicted call `f(...)` (`assert f(X) == Y` and `f(X)` alike), or None."""
  text = _strip_answer(completion)
  if text.startswith("assert "):
    text = text[len("assert ") :]
  node = _expression(text)
  if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
    node = node.left if _calls_f(node.left) else node.comparators[0]
  if node is None or not _calls_f(node):
    return None
  return ast.unparse(node)


def _stdout_lines(text: str) -> list[str]:
  """Output lines as LiveCodeBench compares them: surrounding blank lines and trailing spaces
  do not count."""
  return [line.rstrip() for line in text.strip().splitlines()]


def _compiles(program: str) -> bool:
  """Whether `program` parses (compile builds a code object and runs nothing): code that
  cannot run costs no sandbox process."""
  try:
    compile(program, "<completion>", "exec", dont_inherit=True)
    return True
  except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError):
    return False


def _tests_verdict(program: str, tests: str, limits: sandbox.Limits) -> Verdict:
  if not _compiles(program):
    return Verdict(False, "syntax")
  result = harness.run_tests(program, tests, limits=limits)
  return Verdict(result.passed, result.status, result.message[:300])


def score_one(
  suite: str, task: Task, completion: str, limits: sandbox.Limits = rewards.DEFAULT_LIMITS
) -> Verdict:
  """Whether `completion` solves `task`; every program runs in the sandbox."""
  if task.bad:
    return Verdict(False, "bad_task", task.bad)
  r = task.record
  if suite == "humaneval":
    return _tests_verdict(task.prompt + completion, _humaneval_tests(r), limits)
  if suite == "mbpp":
    return _tests_verdict(rewards.extract_code(completion), _mbpp_tests(r), limits)
  if suite == "cruxeval_o":
    predicted = output_prediction(completion, task)
    if predicted is None:
      return Verdict(False, "bad_answer", "not an expression, or it calls f")
    return _tests_verdict(r["code"], f"assert f({r['input']}) == {predicted}\n", limits)
  if suite == "cruxeval_i":
    predicted = input_prediction(completion, task)
    if predicted is None:
      return Verdict(False, "bad_answer", "no call of f")
    try:
      rewards.check_tests(f"assert {predicted} == {r['output']}\n")
    except harness.BadTests as e:
      return Verdict(False, "bad_answer", str(e))
    return _tests_verdict(r["code"], f"assert {predicted} == {r['output']}\n", limits)
  program = rewards.extract_code(completion)
  if not _compiles(program):
    return Verdict(False, "syntax")
  for i, case in enumerate(r["_cases"]):
    run = sandbox.run_python(program, stdin=case["input"], limits=limits)
    if run.status != "ok":
      return Verdict(False, run.status, f"test {i}: {run.stderr.strip()[-300:]}")
    if _stdout_lines(run.stdout) != _stdout_lines(case["output"]):
      return Verdict(False, "failed", f"test {i}: wrong output")
  return Verdict(True, "pass")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as
  a product (no huge binomials)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(
  suite: str,
  tasks: list[Task],
  samples: dict[str, list[str]],
  ks=(1,),
  limits: sandbox.Limits = rewards.DEFAULT_LIMITS,
  workers: int = 2,
) -> tuple[dict[str, Any], list[dict]]:
  """(summary, per-sample rows) for `samples` {task_id: [completion, ...]}.

  Runs go to `workers` threads (each run is a sandboxed process). The summary counts tasks,
  bad tasks, tasks without samples, samples and passes, status counts, and pass@k for each k
  some task has k samples for (averaged over those tasks; `pass@k_tasks` says how many).
  """
  check_suite(suite)
  jobs = [(t, i, c) for t in tasks for i, c in enumerate(samples.get(t.task_id, []))]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    verdicts = list(pool.map(lambda j: score_one(suite, j[0], j[2], limits), jobs))
  rows = [
    {
      "task_id": t.task_id,
      "sample": i,
      "completion": c,
      "passed": v.passed,
      "status": v.status,
      **({"message": v.message} if v.message else {}),
    }
    for (t, i, c), v in zip(jobs, verdicts)
  ]
  per_task: dict[str, list[bool]] = collections.defaultdict(list)
  for row in rows:
    per_task[row["task_id"]].append(row["passed"])
  good = [t for t in tasks if not t.bad and per_task.get(t.task_id)]
  summary: dict[str, Any] = {
    "suite": suite,
    "tasks": len(tasks),
    "bad_tasks": sum(bool(t.bad) for t in tasks),
    "tasks_without_samples": sum(not t.bad and not per_task.get(t.task_id) for t in tasks),
    "scored_tasks": len(good),
    "samples": sum(len(per_task[t.task_id]) for t in good),
    "passed": sum(sum(per_task[t.task_id]) for t in good),
    "statuses": dict(sorted(collections.Counter(r["status"] for r in rows).items())),
  }
  unscored = []
  for k in sorted(set(ks)):
    eligible = [t for t in good if len(per_task[t.task_id]) >= k]
    if not eligible:
      unscored.append(f"pass@{k}: no task has {k} samples")
      continue
    summary[f"pass@{k}"] = sum(
      pass_at_k(len(per_task[t.task_id]), sum(per_task[t.task_id]), k) for t in eligible
    ) / len(eligible)
    summary[f"pass@{k}_tasks"] = len(eligible)
  if unscored:
    summary["unscored"] = unscored
  return summary, rows


def truncate(suite: str, text: str) -> str:
  """A generated continuation cut where the answer ends: at the next top-level statement for
  code prompts, at the closing fence for LiveCodeBench, at the line's end for predictions."""
  if suite in ("humaneval", "mbpp"):
    cut = min((i for i in (text.find(s) for s in CODE_STOPS) if i >= 0), default=len(text))
    return text[:cut]
  if suite == "livecodebench":
    return text.split("```", 1)[0]
  line = text.split("\n", 1)[0]
  if suite == "cruxeval_i":  # the prompt ends in 'assert f(': keep the call, not '== OUTPUT'
    call = "f(" + line
    node = _expression(call)
    if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.Eq):
      return ast.unparse(node.left)
    return call.split("==", 1)[0].strip()
  return line


def generate(
  model,
  tokenizer,
  suite: str,
  tasks: list[Task],
  *,
  n: int,
  temperature: float,
  max_new_tokens: int,
  batch_size: int = 8,
  seed: int = 0,
) -> dict[str, list[str]]:
  """`n` completions per task from the project's sampler (prompt = BOS + the task's prompt;
  greedy at temperature 0), each cut where its answer ends (`truncate`)."""
  rows = [(t, tokenizer.encode(t.prompt, bos=True)) for t in tasks if not t.bad for _ in range(n)]
  out: dict[str, list[str]] = collections.defaultdict(list)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    result = sampler.generate(
      model,
      [ids for _, ids in chunk],
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      stop_ids=tokenizer.stop_ids,
      seed=seed + start,
    )
    for (task, _), ids in zip(chunk, result.tokens):
      ids = [i for i in ids if not tokenizer.is_special(i)]
      out[task.task_id].append(truncate(suite, tokenizer.decode(ids)))
  return dict(out)


def write_results(path: str, rows: list[dict]) -> None:
  storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
