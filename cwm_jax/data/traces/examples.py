"""Real functions with real inputs to trace: the shipped programs and stdlib doctests."""

from __future__ import annotations

import ast
import dataclasses
import doctest
import hashlib
import importlib
import inspect
import os
from collections.abc import Iterator

from cwm_jax.data.traces import driver, pyast, sandbox
from cwm_jax.data.traces import format as trace_format

PROGRAMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
# Pure-Python stdlib modules whose doctests hold literal calls of top-level functions.
DOCTEST_MODULES = ("statistics", "difflib", "textwrap", "fractions")


@dataclasses.dataclass(frozen=True)
class Call:
  """One call to trace: `function(*args, **kwargs)` of the program `source`."""

  source: str
  function: str
  args: tuple
  kwargs: dict
  origin: str  # file or module it comes from


def program_inputs(source: str, origin: str = "<program>") -> dict[str, list[tuple]]:
  """The module-level `INPUTS = {'function': [(args...), ...]}` literal of a program, read
  with ast (the program is not run here)."""
  for node in pyast.parse(source).body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "INPUTS" for t in node.targets
    ):
      inputs = ast.literal_eval(node.value)
      if not isinstance(inputs, dict) or not all(
        isinstance(v, list) and all(isinstance(a, tuple) for a in v) for v in inputs.values()
      ):
        raise ValueError(f"{origin}: INPUTS must map function names to lists of argument tuples")
      return inputs
  raise ValueError(f'{origin}: no module-level INPUTS dict; add INPUTS = {{"f": [(args...)]}}')


# Held-out rule shared by the corpora (which skip these files) and the evaluation
# (which uses only these): sha256 of the file name, so adding programs never moves
# an existing one between the sets.
HOLD_OUT_MODULUS = 5


def is_held_out(filename: str) -> bool:
  digest = hashlib.sha256(os.path.basename(filename).encode()).hexdigest()
  return int(digest, 16) % HOLD_OUT_MODULUS == 0


def program_calls(programs_dir: str | None = None) -> list[Call]:
  """Every (function, args) declared by the programs in `programs_dir` (default: shipped)."""
  directory = programs_dir or PROGRAMS_DIR
  calls = []
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    path = os.path.join(directory, name)
    with open(path, encoding="utf-8") as f:
      source = f.read()
    for function, arg_tuples in program_inputs(source, path).items():
      calls.extend(Call(source, function, args, {}, path) for args in arg_tuples)
  return calls


def trace_examples(
  programs_dir: str | None = None, limits: sandbox.Limits = sandbox.Limits()
) -> Iterator[tuple[str, str, tuple, driver.TraceResult]]:
  """Yields (source, function, args, TraceResult) for every call the programs declare."""
  for call in program_calls(programs_dir):
    yield (
      call.source,
      call.function,
      call.args,
      driver.trace_call(call.source, call.function, call.args, limits=limits),
    )


def _literal_call(example_source: str, functions: set[str]) -> tuple[str, tuple, dict] | None:
  try:
    node = pyast.parse(example_source, mode="eval").body
  except SyntaxError:
    return None
  if not isinstance(node, ast.Call):
    return None
  name = (
    node.func.id
    if isinstance(node.func, ast.Name)
    else (
      node.func.attr
      if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
      else None
    )
  )
  if (
    name not in functions
    or any(isinstance(a, ast.Starred) for a in node.args)
    or any(k.arg is None for k in node.keywords)
  ):
    return None
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return None
  return name, args, kwargs


def doctest_calls(module_name: str) -> list[Call]:
  """Doctest examples of `module_name` that call one of its top-level functions with literal
  arguments. The module must be a single pure-Python file without relative imports."""
  module = importlib.import_module(module_name)
  path = getattr(module, "__file__", None) or ""
  if not path.endswith(".py") or path.endswith("__init__.py"):
    raise ValueError(
      f"{module_name} is not a single pure-Python file ({path or 'built in'}); "
      "choose a module such as " + ", ".join(DOCTEST_MODULES)
    )
  source = inspect.getsource(module)
  functions = {n.name for n in pyast.parse(source).body if isinstance(n, ast.FunctionDef)}
  calls = []
  for test in doctest.DocTestFinder(recurse=True).find(module):
    for example in test.examples:
      found = _literal_call(example.source, functions)
      if found and not any(
        c.function == found[0] and c.args == found[1] and c.kwargs == found[2] for c in calls
      ):
        calls.append(Call(source, found[0], found[1], found[2], module_name))
  trace_format.check_source(source)
  return calls
