"""Every test that reads XLA:CPU's compiled program (its HLO text or buffer sizes) carries the
`speed_check` marker (tests/conftest.py, docs/testing.md), so that an XLA upgrade that trips
one reads as a speed regression, not a wrong result."""

import ast
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# These compile for accelerators (libtpu's or CUDA's compiler), not for XLA:CPU.
ACCELERATOR_MODULES = ("test_tpu.py", "test_gpu_attention.py", "test_cost_model.py")
READS = ("as_text", "memory_analysis")


def _calls(node, attr: str) -> bool:
  return any(
    isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
    for n in ast.walk(node)
  )


def _reads_compiled_program(fn) -> bool:
  """Compiles something and reads the result's text or memory analysis."""
  return _calls(fn, "compile") and any(_calls(fn, attr) for attr in READS)


def _is_speed_check(node) -> bool:
  return any(
    isinstance(n, ast.Attribute) and n.attr == "speed_check"
    for d in getattr(node, "decorator_list", ())
    for n in ast.walk(d)
  )


def _unmarked(tree) -> list[str]:
  """Test functions that read a compiled program (themselves or through a module-level helper)
  without the marker on them or on the module (`pytestmark`)."""
  defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  module_marked = any(
    isinstance(n, ast.Assign)
    and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
    and any(isinstance(a, ast.Attribute) and a.attr == "speed_check" for a in ast.walk(n.value))
    for n in tree.body
  )
  helpers = {f.name for f in defs if not f.name.startswith("test") and _reads_compiled_program(f)}
  out = []
  for f in defs:
    if not f.name.startswith("test") or module_marked or _is_speed_check(f):
      continue
    used = {n.id for n in ast.walk(f) if isinstance(n, ast.Name)}
    if _reads_compiled_program(f) or used & helpers:
      out.append(f.name)
  return out


def test_tests_reading_compiled_programs_are_speed_checks():
  missing = []
  for name in sorted(os.listdir(HERE)):
    if name.startswith("test_") and name.endswith(".py") and name not in ACCELERATOR_MODULES:
      with open(os.path.join(HERE, name)) as f:
        missing += [f"{name}::{t}" for t in _unmarked(ast.parse(f.read()))]
  assert not missing, f"read XLA:CPU's compiled program without @pytest.mark.speed_check: {missing}"


def test_the_check_finds_an_unmarked_test():
  """The rule is live: direct and helper reads are found, marked tests are not."""
  tree = ast.parse(
    "def _hlo(f):\n  return f.lower().compile().as_text()\n"
    "def test_direct(s):\n  m = s.lower().compile()\n  assert m.memory_analysis()\n"
    "def test_helper():\n  assert 'x' in _hlo(g)\n"
    "@pytest.mark.speed_check\ndef test_marked():\n  assert _hlo(g)\n"
    "def test_lowered_only(f):\n  assert 'x' in f.lower().as_text()\n"
  )
  assert _unmarked(tree) == ["test_direct", "test_helper"]
  marked = ast.parse("import pytest\npytestmark = [pytest.mark.speed_check]\n")
  marked.body += tree.body
  assert _unmarked(marked) == []
