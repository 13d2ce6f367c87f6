"""Verifiers: a completion's reward, +1 if verifiably right, -1 otherwise (CWM's scheme).

  code_reward(completion, tests)      the program plus hidden tests run in the sandbox
  exact_answer_reward(completion, a)  the final answer equals `a` (numbers compared as numbers)
  trace_reward(completion, real)      the predicted trace ends like the interpreter's
  choice_reward(completion, a)        the completion, stripped, is exactly `a` (toy tasks)

Untrusted programs only ever run in the sandbox (`cwm_jax.data.traces`: isolated
namespaces, time, memory, output and disk limits, no network): an endless loop is a
'timeout', an unbounded allocation a 'memory' status, both reward -1. A code reward is +1
only when every assert of the hidden tests holds as evaluated by this process on the values
the program computed in the sandbox (`harness.run_tests`): the program never sees the expected
values and cannot reach the comparison, so exiting early, killing the worker, shadowing
builtins, always-equal objects, patched modules or encoders all earn -1. Tests the caller
cannot judge that way are a bad task (`check_tests` at load; status 'bad_task' if scored).
"""

from __future__ import annotations

import dataclasses
import fractions
import re

from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces.harness import BadTests, compile_tests, run_tests
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer.trace_predict import outcome

PASS, FAIL = 1.0, -1.0
# Short limits: a hidden-test run of a correct small program takes well under a second.
DEFAULT_LIMITS = Limits(timeout_s=3.0, memory_mb=512, output_bytes=100_000)

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Reward:
  """A verifier's verdict: the scalar reward, whether it passed, and why."""

  value: float
  passed: bool
  status: str  # 'pass', or why not: 'wrong', 'syntax', 'error', 'timeout', 'memory', ...


def _verdict(passed: bool, status: str = "") -> Reward:
  return Reward(PASS if passed else FAIL, passed, "pass" if passed else status or "wrong")


def extract_code(completion: str) -> str:
  """The first fenced code block of `completion`, else the whole completion."""
  match = _FENCE.search(completion)
  return match.group(1) if match else completion


def _compiles(source: str) -> bool:
  """Whether `source` parses (nothing is executed: `compile` only builds a code object)."""
  try:
    compile(source, "<completion>", "exec", dont_inherit=True)
    return True
  except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError):
    return False


def check_tests(tests: str) -> None:
  """Raises BadTests (a ValueError) if `tests` cannot be judged outside the program: call it
  when a code task is loaded, and count the task as bad."""
  compile_tests(tests)


def code_reward(completion: str, tests: str, limits: Limits = DEFAULT_LIMITS) -> Reward:
  """+1 iff every assert of `tests` holds on the values the completion's code computed
  (judged by the caller); status 'error' when one failed or could not be evaluated,
  'bad_task' (nothing runs) when the tests cannot be judged outside the program."""
  program = extract_code(completion).rstrip() + "\n"
  try:
    compile_tests(tests)
  except BadTests:
    return _verdict(False, "bad_task")
  if not _compiles(program):
    return _verdict(False, "syntax")  # no process spawned for code that cannot run
  result = run_tests(program, tests, limits=limits)
  return _verdict(result.passed, "error" if result.status == "failed" else result.status)


def final_answer(completion: str) -> str:
  r"""The answer a completion commits to: the last `\boxed{..}`, else the text after the last
  'answer:', else the last non-empty line."""
  boxed = _BOXED.findall(completion)
  if boxed:
    return boxed[-1].strip()
  lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
  for line in reversed(lines):
    match = _ANSWER.search(line)
    if match:
      return match.group(1).strip()
  return lines[-1] if lines else ""


def _normalize(answer: str) -> str:
  return answer.strip().strip("$").rstrip(".").replace(",", "").replace(" ", "").lower()


def _number(text: str) -> fractions.Fraction | None:
  try:
    return fractions.Fraction(text) if len(text) < 64 else None
  except (ValueError, ZeroDivisionError):
    return None


def answers_equal(predicted: str, expected: str) -> bool:
  """Exact match after light normalisation; '42', '42.0' and '84/2' are the same number."""
  a, b = _normalize(predicted), _normalize(expected)
  if a == b:
    return True
  x, y = _number(a), _number(b)
  return x is not None and y is not None and x == y


def exact_answer_reward(completion: str, answer: str) -> Reward:
  """+1 iff the completion's final answer equals `answer`."""
  predicted = final_answer(completion)
  if not predicted:
    return _verdict(False, "no_answer")
  return _verdict(answers_equal(predicted, answer))


def trace_reward(completion: str, real_last_frame: dict) -> Reward:
  """+1 iff the predicted frames end (with <|end_of_text|>) in the interpreter's final
  event and value: the returned value, or the raised exception."""
  frames = trace_format.parse_frames(completion)
  if not frames or trace_format.END not in completion:
    return _verdict(False, "unfinished")
  return _verdict(outcome(frames[-1]) == outcome(real_last_frame))


def choice_reward(completion: str, answer: str) -> Reward:
  """+1 iff the stripped completion is exactly `answer` (the toy digit task)."""
  return _verdict(completion.strip() == answer)
