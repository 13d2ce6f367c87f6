"""Output prediction on procedurally generated short functions (CRUXEval-O style).

Each task is a small function `f` of an integer, a string or a list (code from one of
`TEMPLATES`, with random constants and parameter names) and a call `f(INPUT)`; the policy
answers with the value the call returns (an int or a bool), as a Python literal. The values
are scalars so that a smoke-sized model can get some right after a short warmup: a policy that
never passes gives RL nothing to reinforce. Nothing here knows an expected value: `records` runs
every program in the sandbox (one `sandbox.run_python` for a whole batch) and keeps the repr
the interpreter printed as the task's reference answer (for a supervised warmup), and the
reward (`output_reward`) runs `assert f(INPUT) == PREDICTION` (and the same type) through the
sandbox's test harness, which compares the program's value with the literal outside the
program.

Splits are by program text: a program is held out iff sha256 of its source is 0 mod
`HOLD_OUT_MODULUS`, so no held-out program appears in the training split with any input,
and a given seed always yields the same tasks.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from collections.abc import Callable

from cwm_jax.base import ConfigError
from cwm_jax.data.traces import harness, pyast, sandbox
from cwm_jax.infer import benchmarks, rewards

SPLITS = ("train", "held_out")
HOLD_OUT_MODULUS = 4
_NAMES = ("x", "n", "v", "k", "a", "b", "m", "y")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Runs in the sandbox: each program in a fresh namespace, the repr of its call's value (or None
# when the call raised) printed as one JSON list.
_RUNNER = """\
import json, sys
out = []
for code, call in json.loads(sys.stdin.read()):
    namespace = {"__name__": "program"}
    try:
        exec(code, namespace)
        out.append(repr(eval(call, namespace)))
    except Exception:
        out.append(None)
print(json.dumps(out))
"""


def _word(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
  return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _ints(rng: random.Random) -> list[int]:
  return [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]


def _int_program(rng: random.Random, p: str) -> tuple[str, str]:
  a, b = rng.randint(1, 9), rng.randint(1, 9)
  body = rng.choice(
    (
      f"return {p} + {a}",
      f"return {p} - {a}",
      f"return {p} * {rng.randint(2, 3)}",
      f"return {p} % {rng.randint(2, 5)}",
      f"return {p} // {rng.randint(2, 4)}",
      f"return max({p}, {a})",
      f"return min({p}, {a})",
      f"return {p} > {a}",
      f"return abs({p} - {a})",
      f"if {p} > {a}:\n        return {p} - {b}\n    return {p} + {b}",
    )
  )
  return f"def f({p}):\n    {body}\n", str(rng.randint(0, 12))


def _str_program(rng: random.Random, p: str) -> tuple[str, str]:
  word = _word(rng)
  # Letters of the word half the time, so that membership, counts and tests vary.
  c, first, last = (
    rng.choice(pick if rng.random() < 0.5 else _LETTERS) for pick in (word, word[0], word[-1])
  )
  body = rng.choice(
    (
      f"return len({p})",
      f"return len({p}) + {rng.randint(1, 9)}",
      f"return len({p}) * 2",
      f"return len({p}) > {rng.randint(1, 4)}",
      f"return {c!r} in {p}",
      f"return {p}.count({c!r})",
      f"return {p}.find({c!r})",
      f"return {p}.startswith({first!r})",
      f"return {p}[0] == {first!r}",
      f"return {p}[-1] == {last!r}",
    )
  )
  return f"def f({p}):\n    {body}\n", repr(word)


def _list_program(rng: random.Random, p: str) -> tuple[str, str]:
  xs, a = _ints(rng), rng.randint(1, 5)
  d = rng.choice(xs if rng.random() < 0.5 else range(10))
  body = rng.choice(
    (
      f"return len({p})",
      f"return len({p}) + {a}",
      f"return sum({p})",
      f"return max({p})",
      f"return min({p})",
      f"return {p}[0]",
      f"return {p}[-1]",
      f"return {p}.count({d})",
      f"return {d} in {p}",
      f"return {p}[0] > {p}[-1]",
    )
  )
  return f"def f({p}):\n    {body}\n", repr(xs)


TEMPLATES: tuple[Callable[[random.Random, str], tuple[str, str]], ...] = (
  _int_program,
  _str_program,
  _list_program,
)


def split_of(source: str) -> str:
  """'held_out' or 'train': a fixed function of the program text."""
  digest = int(hashlib.sha256(source.encode()).hexdigest(), 16)
  return "held_out" if digest % HOLD_OUT_MODULUS == 0 else "train"


def programs(n: int, split: str, seed: int = 0) -> list[tuple[str, str]]:
  """`n` distinct (source, input) pairs of `split`, deterministic in `seed`."""
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} must be one of {SPLITS}")
  rng, out, seen = random.Random(f"output/{seed}"), [], set()
  for _ in range(200 * n + 1000):
    if len(out) == n:
      return out
    make = TEMPLATES[rng.randrange(len(TEMPLATES))]
    source, arg = make(rng, rng.choice(_NAMES))
    if split_of(source) == split and (source, arg) not in seen:
      seen.add((source, arg))
      out.append((source, arg))
  raise ConfigError(f"only {len(out)} distinct {split} programs from seed {seed}; ask for fewer")


def run_calls(pairs: list[tuple[str, str]], limits: sandbox.Limits) -> list[str | None]:
  """The repr of each `f(INPUT)`'s value as the interpreter computes it, in the sandbox; None
  where the call raised or its value does not read back as an equal literal."""
  stdin = json.dumps([(source, f"f({arg})") for source, arg in pairs])
  result = sandbox.run_python(_RUNNER, stdin=stdin, limits=limits)
  if result.status != "ok":
    raise RuntimeError(f"output tasks: the sandbox run ended with {result.status}")
  out = []
  for text in json.loads(result.stdout):
    try:
      ok = text is not None and repr(pyast.literal_eval(text)) == text
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      ok = False
    out.append(text if ok else None)
  return out


def records(
  n: int, split: str, seed: int = 0, limits: sandbox.Limits = sandbox.Limits(timeout_s=30.0)
) -> list[dict]:
  """`n` task records of `split` ({id, kind: 'output', code, input, output, reference}; the
  schema of `rl.datasets`), their outputs computed in the sandbox."""
  pairs = programs(n, split, seed)
  outputs = run_calls(pairs, limits)
  return [
    {
      "id": f"output/{split}/{seed}/{i}",
      "kind": "output",
      "code": source,
      "input": arg,
      "output": value,
      "reference": value,
    }
    for i, ((source, arg), value) in enumerate(zip(pairs, outputs))
    if value is not None
  ]


def prompt(code: str, arg: str) -> str:
  """The question last: the call's argument then sits a few tokens before the answer, within
  reach of the smoke model's local-attention layers (window 16)."""
  return (
    "Reply with the value only, as a Python literal.\n"
    f"```python\n{code.rstrip()}\n```\nWhat does `f({arg})` return?"
  )


def literal_text(text: str | None) -> str | None:
  """`text` as one normalised Python literal (layout and comments dropped, so it can be
  parenthesised), or None when it is no literal."""
  if text is None:
    return None
  try:
    node = pyast.parse(text.strip(), mode="eval").body
    ast.literal_eval(node)
    return ast.unparse(node)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return None


def output_reward(
  completion: str, code: str, arg: str, limits: sandbox.Limits = rewards.DEFAULT_LIMITS
) -> rewards.Reward:
  """+1 iff the completion's answer (as CRUXEval-O reads it) is a Python literal P and
  `assert f(ARG) == P` holds with the type of P: the program computes `f(ARG)` in the sandbox
  and this process compares (the harness of CRUXEval-O's scorer). Only a literal counts as a
  prediction: an expression would be evaluated by the program (`[*map(f, [x])][0]` would pass
  without predicting anything). The type must match because `False == 0 == 0.0`: one constant
  answer would otherwise pass every boolean, count and remainder task."""
  literal = literal_text(benchmarks.output_prediction(completion, None))
  if literal is None:
    return rewards.Reward(rewards.FAIL, False, "no_answer")
  tests = f"assert f({arg}) == ({literal})\nassert type(f({arg})) == type({literal})\n"
  try:
    result = harness.run_tests(code, tests, limits=limits)
  except harness.BadTests:
    return rewards.Reward(rewards.FAIL, False, "no_answer")
  status = "pass" if result.passed else "wrong" if result.status == "failed" else result.status
  return rewards.Reward(rewards.PASS if result.passed else rewards.FAIL, result.passed, status)
