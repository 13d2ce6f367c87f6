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

In-loop during training: `SuiteConfig` is a training config's `suites` section and `SuiteEval`
runs it on the current (sharded) params: every process samples the same rows over the training
mesh's row sharding and gets all completions back, each process judges its share of them in
the sandbox, and the verdicts are gathered so that every process reports the same metrics.
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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from cwm_jax import storage
from cwm_jax.base import ConfigError, check_fields
from cwm_jax.data.traces import harness, isolation, pyast, sandbox
from cwm_jax.infer import rewards, sampler
from cwm_jax.parallel import rows as rows_lib

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


def load_tasks(suite: str, path: str, what: str = "--data") -> list[Task]:
  """The tasks of a local (or gs://) JSONL file in `suite`'s published format (`what` names
  where the path came from in errors)."""
  check_suite(suite)
  tasks = [_LOADERS[suite](record, where) for where, record in read_jsonl(path, what)]
  if not tasks:
    raise ConfigError(f"{what} {path} holds no task")
  seen = collections.Counter(t.task_id for t in tasks)
  dupes = sorted(k for k, v in seen.items() if v > 1)
  if dupes:
    raise ConfigError(f"{what} {path}: task ids {dupes[:5]} appear more than once")
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
  # pyast's parse holds a lock: completions are scored in threads, and CPython 3.11's parser
  # fails when two threads build an AST at once.
  try:
    return pyast.parse(text, mode="eval").body
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


def _allgather_json(value) -> list:
  """Every process's JSON-able `value`, in process order (each process calls this alike)."""
  blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: blob.size] = blob
  table = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(table[q, : sizes[q]])) for q in range(len(sizes))]


def _judge(suite: str, jobs: list, limits: sandbox.Limits, workers: int, shared: bool) -> list:
  """The verdict of each (task, index, completion) job. `shared`: every process holds the
  same jobs, judges every process_count-th of them and gets all verdicts back, so each
  program runs once and all processes agree."""
  count, index = (jax.process_count(), jax.process_index()) if shared else (1, 0)
  mine = jobs[index::count]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    local = list(pool.map(lambda j: score_one(suite, j[0], j[2], limits), mine))
  if count == 1:
    return local
  verdicts: list = [None] * len(jobs)
  parts = _allgather_json([[v.passed, v.status, v.message] for v in local])
  for q, part in enumerate(parts):
    for j, (passed, status, message) in zip(range(q, len(jobs), count), part):
      verdicts[j] = Verdict(bool(passed), status, message)
  return verdicts


def score(
  suite: str,
  tasks: list[Task],
  samples: dict[str, list[str]],
  ks=(1,),
  limits: sandbox.Limits = rewards.DEFAULT_LIMITS,
  workers: int = 2,
  shared: bool = False,
) -> tuple[dict[str, Any], list[dict]]:
  """(summary, per-sample rows) for `samples` {task_id: [completion, ...]}.

  Runs go to `workers` threads (each run is a sandboxed process). The summary counts tasks,
  bad tasks, tasks without samples, samples and passes, status counts, and pass@k for each k
  some task has k samples for (averaged over those tasks; `pass@k_tasks` says how many).
  `shared`: every process calls this with the same samples and judges its share of them
  (multi-process training); all get the same summary and rows.
  """
  check_suite(suite)
  jobs = [(t, i, c) for t in tasks for i, c in enumerate(samples.get(t.task_id, []))]
  verdicts = _judge(suite, jobs, limits, workers, shared)
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
  row_sharding: NamedSharding | None = None,
) -> dict[str, list[str]]:
  """`n` completions per task from the project's sampler (prompt = BOS + the task's prompt;
  greedy at temperature 0), each cut where its answer ends (`truncate`).

  `row_sharding` (a row sharding over a mesh, e.g. the training mesh's batch axes) spreads
  the rows over its devices; the params stay as they are sharded. Every process then passes
  all rows alike and gets all completions back; each call holds a multiple of the row blocks
  (filler rows, dropped) and every prompt is padded to the longest one, so one shape serves
  the whole suite."""
  rows = [(t, tokenizer.encode(t.prompt, bos=True)) for t in tasks if not t.bad for _ in range(n)]
  out: dict[str, list[str]] = collections.defaultdict(list)
  if not rows:
    return {}
  per_call, pad = batch_size, 32
  if row_sharding is not None:
    blocks = rows_lib.row_blocks(row_sharding)
    per_call = -(-min(batch_size, len(rows)) // blocks) * blocks
    pad = max(len(ids) for _, ids in rows)
  for start in range(0, len(rows), per_call):
    chunk = rows[start : start + per_call]
    prompts = [ids for _, ids in chunk]
    if row_sharding is not None:
      prompts += [prompts[0]] * (per_call - len(prompts))
    result = sampler.generate(
      model,
      prompts,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      stop_ids=tokenizer.stop_ids,
      seed=seed + start,
      pad_multiple=pad,
      row_sharding=row_sharding,
      global_rows=row_sharding is not None,
    )
    for (task, _), ids in zip(chunk, result.tokens):
      ids = [i for i in ids if not tokenizer.is_special(i)]
      out[task.task_id].append(truncate(suite, tokenizer.decode(ids)))
  return dict(out)


def write_results(path: str, rows: list[dict]) -> None:
  storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _ks_of(value) -> tuple[int, ...] | None:
  """pass@k's k from '1,10', 1 or [1, 10]; None when they are not positive integers."""
  parts = (
    value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
  )
  try:
    ks = tuple(int(p) for p in parts if not isinstance(p, (bool, float)))
  except (TypeError, ValueError):
    return None
  if len(ks) != len(parts) or not ks or min(ks) < 1:
    return None
  return ks


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """The `suites` section of a training config: these benchmarks in-loop every `every` steps.

  Each suite field is a local (or gs://) data file in that suite's published format ('': the
  suite is not run). Every check is made here and in `SuiteEval` before anything compiles.
  """

  every: int = 0  # steps between evaluations (0: off)
  humaneval: str = ""
  mbpp: str = ""
  cruxeval_o: str = ""
  cruxeval_i: str = ""
  livecodebench: str = ""
  n: int = 1  # completions sampled per task
  k: str = "1"  # pass@k for these k, comma-separated; each at most n
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0: greedy (then n must be 1)
  limit: int = 0  # the first `limit` tasks of each file (0: all)
  batch_size: int = 8  # rows per sampling call (rounded up to a multiple of the row blocks)
  workers: int = 2  # sandboxed runs at a time, on each process

  @classmethod
  def from_mapping(cls, m) -> SuiteConfig:
    """From a dict or ml_collections ConfigDict; unknown fields are an error."""
    d = dict(m.to_dict() if hasattr(m, "to_dict") else m)
    check_fields(d, (f.name for f in dataclasses.fields(cls)), "suites", "fields")
    return cls(**d)

  @property
  def data(self) -> dict[str, str]:
    """{suite: data file} of the suites to run."""
    return {s: getattr(self, s) for s in SUITES if getattr(self, s)}

  @property
  def ks(self) -> tuple[int, ...]:
    return tuple(sorted(set(_ks_of(self.k) or ())))

  def __post_init__(self):
    errors = []
    for name in ("every", "n", "max_new_tokens", "limit", "batch_size", "workers"):
      value, least = getattr(self, name), 0 if name in ("every", "limit") else 1
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        errors.append(f"suites.{name}={value!r} must be an integer >= {least}")
    errors += [
      f"suites.{s}={getattr(self, s)!r} must be a data file path (or '')"
      for s in SUITES
      if not isinstance(getattr(self, s), str)
    ]
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
      errors.append(f"suites.temperature={t!r} must be a finite number >= 0")
    elif isinstance(self.n, int) and self.n > 1 and t == 0:
      errors.append(
        f"suites.n={self.n} greedy completions would all be the same; set "
        "suites.temperature (e.g. 0.8) or suites.n=1"
      )
    ks = _ks_of(self.k)
    if ks is None:
      errors.append(f"suites.k={self.k!r} must be positive integers, e.g. '1' or '1,10'")
    elif isinstance(self.n, int) and max(ks) > self.n:
      errors.append(
        f"suites.k={self.k!r}: pass@{max(ks)} needs at least {max(ks)} samples per task; "
        f"raise suites.n (it is {self.n}) or lower k"
      )
    if not errors and self.every and not self.data:
      errors.append(
        f"suites.every={self.every} but no suite names a data file; set one of "
        + ", ".join(f"suites.{s}" for s in SUITES)
      )
    if not errors and not self.every and self.data:
      errors.append(
        f"{', '.join(f'suites.{s}' for s in self.data)} set but suites.every=0; set "
        "suites.every=N to run them every N steps (or clear the data files)"
      )
    if errors:
      raise ConfigError("; ".join(errors))


class SuiteEval:
  """The suites of a `SuiteConfig`, loaded and checked against the model and tokenizer
  (ConfigError: a missing or malformed file, no task that can be judged, prompts that do not
  fit `max_seq_len` with `max_new_tokens`, a tokenizer the model cannot read, no sandbox
  isolation); calling it samples and scores them all on a model at a step."""

  def __init__(self, config: SuiteConfig, tokenizer, model_cfg):
    self.config, self.tokenizer = config, tokenizer
    self.tasks: dict[str, list[Task]] = {}
    for suite, path in config.data.items():
      try:
        tasks = load_tasks(suite, path, f"suites.{suite}")
      except ConfigError as e:
        where = f"suites.{suite}"
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
      tasks = tasks[: config.limit] if config.limit else tasks
      good = [t for t in tasks if not t.bad]
      if not good:
        raise ConfigError(
          f"suites.{suite}: none of the {len(tasks)} tasks of {path} can be judged "
          f"({tasks[0].bad}); fix the file or raise suites.limit"
        )
      longest = max(len(tokenizer.encode(t.prompt, bos=True)) for t in good)
      if longest + config.max_new_tokens > model_cfg.max_seq_len:
        raise ConfigError(
          f"suites.{suite}: the longest prompt of {path} ({longest} tokens) + "
          f"suites.max_new_tokens={config.max_new_tokens} exceeds the model's max_seq_len="
          f"{model_cfg.max_seq_len}; lower max_new_tokens or suites.limit"
        )
      self.tasks[suite] = tasks
    if tokenizer.vocab_size > model_cfg.vocab_size:
      raise ConfigError(
        f"suites: the tokenizer has {tokenizer.vocab_size} ids but the model only "
        f"{model_cfg.vocab_size}; set model.overrides.vocab_size >= {tokenizer.vocab_size} "
        "(or data.tokenizer to the model's rank file)"
      )
    limits = rewards.DEFAULT_LIMITS  # refused now rather than at the first evaluation
    isolation.check(limits.namespaces, limits.allow_no_isolation)

  def __call__(
    self,
    model,
    step: int,
    row_sharding: NamedSharding | None = None,
    results_dir: str | None = None,
  ) -> dict[str, float]:
    """Samples and scores every suite with `model` (every process calls this alike);
    returns `eval/SUITE/...` metrics (counts, pass@k) and, on process 0, writes each suite's
    per-sample rows to `results_dir/SUITE/step_STEP.jsonl`."""
    c, metrics = self.config, {}
    for suite, tasks in self.tasks.items():
      samples = generate(
        model,
        self.tokenizer,
        suite,
        tasks,
        n=c.n,
        temperature=c.temperature,
        max_new_tokens=c.max_new_tokens,
        batch_size=c.batch_size,
        seed=step * 1_000_003,
        row_sharding=row_sharding,
      )
      summary, rows = score(suite, tasks, samples, c.ks, workers=c.workers, shared=True)
      if results_dir is not None and jax.process_index() == 0:
        write_results(storage.join(results_dir, suite, f"step_{step}.jsonl"), rows)
      metrics.update(suite_metrics(summary))
    return metrics


def suite_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
  """A `score` summary as `eval/SUITE/NAME` floats: its counts and each pass@k it scored."""
  return {
    f"eval/{summary['suite']}/{k}": float(v)
    for k, v in summary.items()
    if isinstance(v, (int, float)) and not isinstance(v, bool)
  }
