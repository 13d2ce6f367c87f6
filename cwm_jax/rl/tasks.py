"""A small embedded RL task set: each task is a prompt plus the verifier of its completions.

Kinds (`build_tasks(kinds, ...)`):
  code   write a function; hidden asserts run in the sandbox (rewards.code_reward)
  math   arithmetic with an exact answer (rewards.exact_answer_reward)
  trace  predict a shipped program's execution trace from its call frame; the final
         return/exception must equal the interpreter's (rewards.trace_reward)
  output the value a generated short function's call returns (rl.output_tasks: CRUXEval-O
         style, judged by `assert f(INPUT) == PREDICTION` through the sandbox's harness)
  toy    name the digit hidden in a short string (rewards.choice_reward): learnable by a
         tiny model in a few dozen RL updates
Chat tasks are `<|begin_of_text|>` + a user message + an open assistant header; the
completion ends at a stop token. `reference_ids` is a correct completion (for a
supervised warmup); it is never shown to the policy.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import operator
from collections.abc import Callable

import numpy as np

from cwm_jax.base import ConfigError
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces import program_calls
from cwm_jax.infer import rewards
from cwm_jax.infer.trace_predict import TraceError, prompt_text, real_trace
from cwm_jax.rl import output_tasks as output_lib

KINDS = ("code", "math", "trace", "output", "toy")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str
  prompt_ids: tuple[int, ...]
  verify: Callable[[str], rewards.Reward]  # completion text (stop token removed) -> Reward
  reference_ids: tuple[int, ...] = ()  # a correct completion with its stop token (warmup)
  tools: tuple[str, ...] = ()  # sandbox tools of a multi-turn task (rl.episodes)


# (function, statement, reference solution, hidden tests)
CODE_PROBLEMS = (
  (
    "add",
    "returns the sum of a and b",
    "def add(a, b):\n    return a + b\n",
    "assert add(1, 2) == 3\nassert add(-5, 5) == 0\nassert add(10, 32) == 42",
  ),
  (
    "is_even",
    "returns True if the integer n is even, else False",
    "def is_even(n):\n    return n % 2 == 0\n",
    "assert is_even(4) is True\nassert is_even(7) is False\nassert is_even(0) is True",
  ),
  (
    "reverse",
    "returns the string s reversed",
    "def reverse(s):\n    return s[::-1]\n",
    "assert reverse('abc') == 'cba'\nassert reverse('') == ''",
  ),
  (
    "largest",
    "returns the largest element of a non-empty list xs",
    "def largest(xs):\n    return max(xs)\n",
    "assert largest([3, 9, 2]) == 9\nassert largest([-4, -2]) == -2",
  ),
  (
    "count_vowels",
    "returns how many of the characters of s are in 'aeiou'",
    "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
    "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0",
  ),
  (
    "factorial",
    "returns n! for an integer n >= 0",
    "def factorial(n):\n    return 1 if n < 2 else n * factorial(n - 1)\n",
    "assert factorial(0) == 1\nassert factorial(5) == 120",
  ),
  (
    "sum_squares",
    "returns 1*1 + 2*2 + ... + n*n",
    "def sum_squares(n):\n    return sum(i * i for i in range(1, n + 1))\n",
    "assert sum_squares(3) == 14\nassert sum_squares(0) == 0",
  ),
  (
    "dedupe",
    "returns the list xs without repeats, keeping first occurrences in order",
    "def dedupe(xs):\n    return list(dict.fromkeys(xs))\n",
    "assert dedupe([3, 1, 3, 2, 1]) == [3, 1, 2]\nassert dedupe([]) == []",
  ),
)


def _chat(tokenizer, text: str) -> tuple[int, ...]:
  return tuple(tokenizer.encode_dialog([("user", text)]))


def _answer(tokenizer, text: str) -> tuple[int, ...]:
  """An assistant reply: the text and <|eot_id|>."""
  return (*tokenizer.encode(text), tokenizer.special_id("<|eot_id|>"))


def code_tasks(
  tokenizer,
  limits=rewards.DEFAULT_LIMITS,
  problems=CODE_PROBLEMS,
  bad: collections.Counter | None = None,
) -> list[Task]:
  """The code tasks of `problems`; those whose tests cannot be judged outside the program
  (rewards.check_tests) are left out and counted in `bad` (by reason 'bad_tests')."""
  out = []
  for name, statement, solution, tests in problems:
    try:
      rewards.check_tests(tests)
    except ValueError as e:
      logging.warning("code task %s left out: %s", name, e)
      if bad is not None:
        bad["bad_tests"] += 1
      continue
    text = f"Write a Python function `{name}` that {statement}. Reply with the code only."
    out.append(
      Task(
        f"code/{name}",
        "code",
        _chat(tokenizer, text),
        functools.partial(rewards.code_reward, tests=tests, limits=limits),
        _answer(tokenizer, solution),
      )
    )
  return out


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def math_tasks(tokenizer, n: int = 16, seed: int = 0) -> list[Task]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(2, 50, size=2))
    op = "+-*"[i % 3]
    answer = str(_OPS[op](a, b))
    text = f"What is {a} {op} {b}? Reply with the number only."
    out.append(
      Task(
        f"math/{a}{op}{b}",
        "math",
        _chat(tokenizer, text),
        functools.partial(rewards.exact_answer_reward, answer=answer),
        _answer(tokenizer, answer),
      )
    )
  return out


def trace_tasks(tokenizer, max_prompt_len: int, limit: int = 0) -> list[Task]:
  """Output prediction on the shipped programs' calls whose prompt fits `max_prompt_len`."""
  out = []
  for call in program_calls():
    ids = tokenizer.encode_trace(
      prompt_text(call.source, call.function, {"event": "call", "line": "", "locals": {}})
    )
    if len(ids) > max_prompt_len:  # cheap bound before running the interpreter
      continue
    try:
      frames = real_trace(call.source, call.function, call.args, call.kwargs)
    except TraceError:
      continue
    ids = tokenizer.encode_trace(prompt_text(call.source, call.function, frames[0]))
    if len(ids) > max_prompt_len:
      continue
    name = f"trace/{call.function}{call.args!r}"[:80]
    out.append(
      Task(
        name,
        "trace",
        tuple(ids),
        functools.partial(rewards.trace_reward, real_last_frame=frames[-1]),
        tuple(tokenizer.encode_trace(trace_format.format_frames(frames[1:]))),
      )
    )
    if limit and len(out) >= limit:
      break
  return out


def output_task(record: dict, tokenizer, limits=rewards.DEFAULT_LIMITS) -> Task:
  """The Task of an output-prediction record ({id, code, input, reference}, see
  rl.output_tasks.records); its reference is the interpreter's value."""
  code, arg = record["code"], record["input"]
  reference = record.get("reference")
  return Task(
    str(record["id"]),
    "output",
    _chat(tokenizer, output_lib.prompt(code, arg)),
    functools.partial(output_lib.output_reward, code=code, arg=arg, limits=limits),
    _answer(tokenizer, reference) if isinstance(reference, str) else (),
  )


def output_tasks(
  tokenizer, n: int = 64, seed: int = 0, limits=rewards.DEFAULT_LIMITS
) -> list[Task]:
  """Output prediction on `n` generated training-split programs (their values computed in the
  sandbox); the held-out split is for evaluation."""
  return [output_task(r, tokenizer, limits) for r in output_lib.records(n, "train", seed)]


def toy_tasks(tokenizer) -> list[Task]:
  """'Which digit is in "ab7c"?' for every digit and a few placements."""
  out = []
  for digit in range(10):
    for filler in ("ab{}c", "x{}yz", "{}pq", "mn{}"):
      text = f"Which digit is in {filler.format(digit)!r}? Reply with the digit only."
      out.append(
        Task(
          f"toy/{filler.format(digit)}",
          "toy",
          _chat(tokenizer, text),
          functools.partial(rewards.choice_reward, answer=str(digit)),
          _answer(tokenizer, str(digit)),
        )
      )
  return out


class DigitVocab:
  """A 16-token vocabulary for the from-scratch toy task: ids 0-9 are the digits, then
  <bos>, <eos> (the stop token) and four filler letters."""

  vocab_size, bos_id, eos_id = 16, 10, 11
  stop_ids = (11,)
  FILLER = "abcd"

  def decode(self, ids) -> str:
    chars = {**{i: str(i) for i in range(10)}, **{12 + i: c for i, c in enumerate(self.FILLER)}}
    return "".join(chars.get(int(i), "") for i in ids)


def digit_tasks(length: int = 2, n: int = 64, seed: int = 0) -> list[Task]:
  """Prompts `<bos>` + `length` tokens: filler letters and one digit; the answer is the digit
  (one token). Random init picks it with probability ~1/16."""
  rng = np.random.default_rng(seed)
  vocab, out = DigitVocab(), []
  for i in range(n):
    digit, where = i % 10, int(rng.integers(length))
    body = [int(x) for x in rng.integers(12, 16, size=length)]
    body[where] = digit
    out.append(
      Task(
        f"digit/{i}",
        "toy",
        (vocab.bos_id, *body),
        functools.partial(rewards.choice_reward, answer=str(digit)),
        (digit, vocab.eos_id),
      )
    )
  return out


def build_tasks(
  kinds: str, tokenizer, *, max_prompt_len: int, seed: int = 0, limits=rewards.DEFAULT_LIMITS
) -> list[Task]:
  """The tasks of the comma-separated `kinds` whose prompts fit `max_prompt_len` tokens."""
  names = [k.strip() for k in kinds.split(",") if k.strip()]
  unknown = sorted(set(names) - set(KINDS))
  if unknown or not names:
    raise ConfigError(f"rl.tasks={kinds!r}: unknown kinds {unknown}; choose from {KINDS}")
  makers = {
    "code": lambda: code_tasks(tokenizer, limits),
    "math": lambda: math_tasks(tokenizer, seed=seed),
    "trace": lambda: trace_tasks(tokenizer, max_prompt_len),
    "output": lambda: output_tasks(tokenizer, seed=seed, limits=limits),
    "toy": lambda: toy_tasks(tokenizer),
  }
  tasks = [t for name in names for t in makers[name]() if len(t.prompt_ids) <= max_prompt_len]
  if not tasks:
    raise ConfigError(
      f"no task of rl.tasks={kinds!r} has a prompt of at most {max_prompt_len} "
      "tokens; raise seq_len or lower rl.max_new_tokens"
    )
  return tasks


def task_set(
  kinds: str, *, max_prompt_len: int, seed: int = 0, limits=rewards.DEFAULT_LIMITS
) -> tuple[object, list[Task]]:
  """(tokenizer, tasks): 'digits' is the from-scratch toy task on `DigitVocab`; any other
  kinds use the project tokenizer."""
  if "digits" in kinds:
    if kinds.strip() != "digits":
      raise ConfigError(
        f"rl.tasks={kinds!r}: 'digits' has its own vocabulary and cannot be mixed with other kinds"
      )
    return DigitVocab(), digit_tasks(seed=seed)
  tokenizer = Tokenizer.default()
  return tokenizer, build_tasks(
    kinds, tokenizer, max_prompt_len=max_prompt_len, seed=seed, limits=limits
  )
