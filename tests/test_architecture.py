"""The package reads as its architecture: layers, one-way imports, no cycles.

Layers, bottom to top (README "Layout"): base -> kernels -> model -> parallel ->
data, checkpoint -> train -> infer -> rl -> recipe -> programs. A module imports
only from its own layer or below, never in a circle, and at module top, except
optional heavy dependencies, which are imported where used.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = os.path.join(ROOT, "cwm_jax")

LAYERS = {
  "base": 0,
  "host_memory": 0,
  "storage": 0,
  "kernels": 1,
  "model": 2,
  "parallel": 3,
  "data": 4,
  "checkpoint": 4,
  "train": 5,
  "infer": 6,
  "rl": 7,
  "recipe": 8,
}
PROGRAM_LAYER = 9
# Command-line programs: `python -m cwm_jax.<name>` (plus the training and corpus-build
# programs, which live beside their packages) and their shared runner.
PROGRAMS = {
  "cwm_jax.cli",
  "cwm_jax.convert",
  "cwm_jax.evaluate",
  "cwm_jax.plan",
  "cwm_jax.predict_trace",
  "cwm_jax.sample",
  "cwm_jax.score",
  "cwm_jax.sweep",
  "cwm_jax.trace",
  "cwm_jax.train.__main__",
  "cwm_jax.data.build",
  "cwm_jax.report",
}
# Imported where used, so that a light process does not pay for them.
OPTIONAL_HEAVY = (
  "torch",
  "transformers",
  "tensorflow_datasets",
  "apache_beam",
  "libtpu",
  "wandb",
  "matplotlib",
  "tensorboardX",
  "jax.experimental.pallas",
  "array_record.beam",
)  # array_record's Beam sink imports apache_beam
# Code that runs inside the sandboxed child interpreter imports lazily on purpose: the
# child starts from a minimal `-I -S` interpreter and must not import what the program
# under test could have replaced.
CHILD_SIDE = (
  "cwm_jax.data.traces.child",
  "cwm_jax.data.traces.worker",
  "cwm_jax.data.traces.supervisor",
  "cwm_jax.data.traces.tracer",
  "cwm_jax.data.traces.harness",
  "cwm_jax.data.traces.repo_child",
)
# `plan` re-executes itself with XLA_FLAGS naming the device count before jax is
# imported, so it imports the jax-importing library modules inside main().
DEFERS_JAX = ("cwm_jax.plan", "cwm_jax.sweep")


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(PACKAGE):
    if os.path.basename(d) == "programs":  # shipped example programs to trace, not package code
      continue
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(d, f)
  return out


MODULES = _modules()


def _layer(module: str) -> int:
  if module in PROGRAMS:
    return PROGRAM_LAYER
  parts = module.split(".")
  if len(parts) == 1:
    return -1  # the package root
  if parts[1] not in LAYERS:
    raise AssertionError(f"{module}: no layer; add it to LAYERS or PROGRAMS (and the README)")
  return LAYERS[parts[1]]


def _imports(path: str):
  """(imported module, line, at module top) for every absolute import in `path`."""
  tree = ast.parse(open(path).read())
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [
        f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
        for a in node.names
      ]
    else:
      continue
    for name in names:
      yield name, node.lineno, id(node) in top


def _graph() -> dict[str, set[str]]:
  return {m: {n for n, _, _ in _imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}


def _upward(graph: dict[str, set[str]]) -> list[str]:
  return sorted(
    f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
    for m, deps in graph.items()
    for n in deps
    if _layer(n) > _layer(m) and not n.startswith(m + ".")
  )


def _cycles(graph: dict[str, set[str]]) -> list[str]:
  # A package __init__ importing its own submodules is not a cycle.
  graph = {m: {n for n in deps if not n.startswith(m + ".")} for m, deps in graph.items()}
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(graph.get(m, ())):
      if state.get(n) == "open":
        cycles.append(" -> ".join(stack[stack.index(n) :] + [n]))
      elif n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return cycles


def test_no_module_imports_from_a_layer_above():
  assert not _upward(_graph()), "\n".join(_upward(_graph()))


def test_no_import_cycles():
  assert not _cycles(_graph()), "\n".join(_cycles(_graph()))


def test_imports_are_at_module_top_except_optional_heavy_ones():
  deferred = []
  for m, path in MODULES.items():
    if m in CHILD_SIDE:
      continue
    for name, line, at_top in _imports(path):
      if at_top or name.startswith(OPTIONAL_HEAVY) or m in DEFERS_JAX:
        continue
      deferred.append(f"{m}:{line} imports {name} inside a function")
  assert not deferred, "\n".join(sorted(deferred))


def test_every_module_says_what_it_owns():
  missing = [
    m
    for m, path in MODULES.items()
    if not (ast.get_docstring(ast.parse(open(path).read())) or "").strip()
  ]
  assert not missing, f"modules without a docstring: {sorted(missing)}"


@pytest.mark.parametrize(
  "command", sorted(p.split(".")[-1] for p in PROGRAMS if p.count(".") == 1 and p != "cwm_jax.cli")
)
def test_no_library_module_shares_a_command_name(command):
  clashes = [m for m in MODULES if m not in PROGRAMS and m.split(".")[-1] == command]
  assert not clashes, f"library modules named like the command {command!r}: {clashes}"


def test_checks_catch_a_violation():
  """The rules are live: an upward import and a cycle in a made-up graph are found."""
  fake = {
    "cwm_jax.model.config": {"cwm_jax.train.lm"},
    "cwm_jax.train.lm": {"cwm_jax.train.step"},
    "cwm_jax.train.step": {"cwm_jax.train.lm"},
  }
  assert _upward(fake) == ["cwm_jax.model.config (layer 2) imports cwm_jax.train.lm (layer 5)"]
  assert _cycles(fake) == ["cwm_jax.train.lm -> cwm_jax.train.step -> cwm_jax.train.lm"]
  with pytest.raises(AssertionError, match="no layer"):
    _layer("cwm_jax.nowhere.module")
