"""run_tests: run a program in the sandbox; the caller, not the program, decides every verdict.

The tests (trusted: they come with the task) are compiled here into a plan before anything
runs. Each assert is split at the boundary of what this process can evaluate by itself:
constants, containers, arithmetic, comparisons (equality, tolerance, membership, ordering,
`is` against None/True/False), `and`/`or`/`not`, subscripts, comprehensions over values, and
calls of a fixed set of pure builtins and whitelisted stdlib modules (the caller's own copies).
Every maximal sub-expression outside that set (a call of the program's function, a name the
program defines, an attribute of a returned object) becomes a *value item*: the worker
(worker.py, mode 'test') evaluates it after the program ran and sends back the repr of its
value, which must be a builtin value. This process reads each value back as a literal (plain
data: no user `__eq__`, `__sub__` or `__bool__` survives) and evaluates the assert itself. The
expected values never enter the sandbox, and nothing the program defines, patches or plants
(frames, the worker's globals, `sys.modules`, json encoders, dunder methods) reaches the
comparison: at worst it changes the values it reports, which it could have returned anyway.

Supported statements: `assert EXPR[, MSG]`, `import M` / `from M import n` of whitelisted
stdlib modules, `NAME = EXPR`, `for TARGET in ITERABLE:` over a value known when the tests are
compiled (unrolled), `def check(candidate): ...` called as `check(NAME)` (HumanEval; inlined),
docstrings and `pass`. Any other form is rejected when the task is loaded (`compile_tests`
raises `BadTests`, a ValueError): it is never judged inside the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import cmath
import collections
import dataclasses
import decimal
import fractions
import math
import string

from cwm_jax.data.traces import pyast, sandbox

_MAX_VALUE_CHARS = 100_000  # a returned value's repr longer than this fails its test
_MAX_UNROLLED = 1000  # statements a `for` loop or `check()` may expand into
_MAX_ITEMS = 2000  # value and statement items sent to the worker
_MAX_REPEAT = 1 << 22  # elements a `*` / `**` / `<<` in the caller may produce
# What tests may import: evaluated with this process's own modules, never the sandbox's.
MODULES = {
  "math": math,
  "cmath": cmath,
  "collections": collections,
  "decimal": decimal,
  "fractions": fractions,
  "string": string,
}
_BUILTINS = (
  "abs",
  "all",
  "any",
  "bin",
  "bool",
  "chr",
  "complex",
  "dict",
  "divmod",
  "enumerate",
  "float",
  "frozenset",
  "hex",
  "int",
  "isinstance",
  "len",
  "list",
  "max",
  "min",
  "oct",
  "ord",
  "pow",
  "range",
  "repr",
  "reversed",
  "round",
  "set",
  "sorted",
  "str",
  "sum",
  "tuple",
  "type",
  "zip",
  "bytes",
  "True",
  "False",
  "None",
  "Ellipsis",
)
_SINGLETONS = (None, True, False, Ellipsis)
_PLACEHOLDER = "__cwm_v%d__"


class BadTests(ValueError):
  """The tests use a form the caller cannot judge by itself: a bad task, never run."""


@dataclasses.dataclass(frozen=True)
class TestsResult:
  __test__ = False  # not a pytest class
  passed: bool  # every assert was evaluated here and held
  status: str  # 'pass', 'failed' (an assert failed or could not be evaluated), or the sandbox's
  message: str
  run: sandbox.SandboxResult


@dataclasses.dataclass(frozen=True)
class Plan:
  """The compiled tests: `items` go to the worker; `steps` run here on the values it returns.

  items: ['exec', statement] (runs in the sandbox so that later items can use its names) or
         ['value', k, expression] (its value is bound to placeholder k in both processes).
  steps: ('assert', code, text) or ('bind', code, name), in test order; `code` refers to
         placeholders, caller-side names and the caller's whitelisted callables only.
  """

  items: list
  steps: list
  env: dict  # names bound when the tests were compiled (imports, constants)


def _caller_builtins() -> dict:
  names = {n: getattr(builtins, n) for n in _BUILTINS}
  names.update(__cwm_binop__=_guarded_binop)
  return names


def _guarded_binop(op: str, a, b):
  """a OP b for the operators that can build huge values from small ones (the program's values
  reach them): refused past _MAX_REPEAT elements, digits or bits."""
  if (
    op == "Pow"
    and isinstance(a, (int, float, complex))
    and isinstance(b, int)
    and (abs(b) > 4096 and not (isinstance(a, int) and a in (-1, 0, 1)))
  ):
    raise OverflowError("exponent too large for a test")
  if op == "LShift" and isinstance(b, int) and b > _MAX_REPEAT:
    raise OverflowError("shift too large for a test")
  if (
    op == "Mult"
    and isinstance(a, (str, bytes, list, tuple)) + isinstance(b, (str, bytes, list, tuple)) == 1
  ):
    seq, times = (a, b) if isinstance(a, (str, bytes, list, tuple)) else (b, a)
    if isinstance(times, int) and len(seq) * max(times, 0) > _MAX_REPEAT:
      raise OverflowError("repetition too large for a test")
  return {"Pow": lambda: a**b, "LShift": lambda: a << b, "Mult": lambda: a * b}[op]()


class _Splitter:
  """Rewrites expressions: what this process can evaluate stays, the rest becomes value items."""

  def __init__(self, plan_items: list, known: set):
    self.items, self.known = plan_items, known  # names the caller binds (env, test variables)

  def value_item(self, node) -> ast.Name:
    if len(self.items) >= _MAX_ITEMS:
      raise BadTests(f"the tests need more than {_MAX_ITEMS} values")
    k = len(self.items)
    self.items.append(["value", k, ast.unparse(node)])
    return ast.copy_location(ast.Name(_PLACEHOLDER % k, ast.Load()), node)

  def split(self, node, local=frozenset()):
    """`node` with its non-evaluable parts replaced by placeholders. Inside comprehensions
    (`local` names bound), nothing may need the program: that would need one value per
    element, which cannot be named before the run."""
    if self.evaluable(node, local):
      return self.rebuild(node, local)
    if local:
      raise BadTests(
        "a comprehension calls the program per element: "
        f"{ast.unparse(node)[:120]}; write one assert per value instead"
      )
    if not self.needs_program(node, local):  # expected values are never computed by the program
      raise BadTests(
        f"`{ast.unparse(node)[:120]}` is neither the program's value nor something "
        "the caller can evaluate"
      )
    return self.value_item(node)

  def evaluable(self, node, local) -> bool:
    """Whether the root of `node` is something the caller evaluates (its children are split).
    A method is called here only on a value the caller computes without the program."""
    if isinstance(
      node,
      (
        ast.Constant,
        ast.Tuple,
        ast.List,
        ast.Set,
        ast.Dict,
        ast.UnaryOp,
        ast.BinOp,
        ast.BoolOp,
        ast.Compare,
        ast.IfExp,
        ast.Subscript,
        ast.Slice,
        ast.ListComp,
        ast.SetComp,
        ast.GeneratorExp,
        ast.DictComp,
        ast.Attribute,
      ),
    ):
      return not any(isinstance(n, ast.Starred) for n in ast.iter_child_nodes(node))
    if isinstance(node, ast.Name):
      return node.id in self.known or node.id in local or node.id in _BUILTINS
    if isinstance(node, ast.Call):
      func = node.func
      own = (
        isinstance(func, ast.Name)
        and self.evaluable(func, local)
        or (isinstance(func, ast.Attribute) and not self.needs_program(func.value, local))
      )
      return (
        own
        and not any(isinstance(a, ast.Starred) for a in node.args)
        and all(k.arg is not None for k in node.keywords)
      )
    return False

  def needs_program(self, node, local) -> bool:
    """Whether `node` mentions a name the caller does not bind (the program's)."""
    return any(
      isinstance(n, ast.Name) and not (n.id in self.known or n.id in local or n.id in _BUILTINS)
      for n in ast.walk(node)
    )

  def rebuild(self, node, local):
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
      return self.comprehension(node, local)
    if isinstance(node, ast.Compare):
      self.check_identity(node)
    if isinstance(node, (ast.Name, ast.Constant)):
      return node
    if isinstance(node, ast.Call):
      return ast.copy_location(
        ast.Call(
          self.split(node.func, local),
          [self.split(a, local) for a in node.args],
          [ast.keyword(k.arg, self.split(k.value, local)) for k in node.keywords],
        ),
        node,
      )
    fields = {}
    for name, value in ast.iter_fields(node):
      if isinstance(value, ast.expr):
        fields[name] = self.split(value, local)
      elif isinstance(value, list) and value and isinstance(value[0], ast.expr):
        fields[name] = [self.split(v, local) for v in value]
      elif isinstance(value, list) and None in value:  # dict keys of `**` unpacking
        raise BadTests("`**` in a dict display")
      else:
        fields[name] = value
    return ast.copy_location(type(node)(**fields), node)

  def check_identity(self, node):
    """`is` compares identity, which a value read back as a literal does not keep, except
    for the singletons."""
    operands = [node.left, *node.comparators]
    for i, op in enumerate(node.ops):
      if isinstance(op, (ast.Is, ast.IsNot)) and not any(
        isinstance(n, ast.Constant) and any(n.value is s for s in _SINGLETONS)
        for n in operands[i : i + 2]
      ):
        raise BadTests(
          "`is` compares identity; only `is None/True/False` can be judged: "
          + ast.unparse(node)[:120]
        )

  def comprehension(self, node, local):
    names = set(local)
    generators = []
    for i, gen in enumerate(node.generators):
      if gen.is_async:
        raise BadTests("async comprehension")
      iterable = self.split(gen.iter, frozenset(names)) if i else self.split(gen.iter, local)
      names |= _target_names(gen.target)
      inner = frozenset(names)
      generators.append(
        ast.comprehension(gen.target, iterable, [self.split(c, inner) for c in gen.ifs], 0)
      )
    inner = frozenset(names)
    if isinstance(node, ast.DictComp):
      out = ast.DictComp(self.split(node.key, inner), self.split(node.value, inner), generators)
    else:
      out = type(node)(self.split(node.elt, inner), generators)
    return ast.copy_location(out, node)


class _GuardBinops(ast.NodeTransformer):
  """`a ** b`, `a << b`, `a * b` -> `__cwm_binop__(op, a, b)` in the caller's code."""

  def visit_BinOp(self, node):
    self.generic_visit(node)
    op = type(node.op).__name__
    if op not in ("Pow", "LShift", "Mult"):
      return node
    return ast.copy_location(
      ast.Call(
        ast.Name("__cwm_binop__", ast.Load()), [ast.Constant(op), node.left, node.right], []
      ),
      node,
    )


def _target_names(target) -> set:
  if isinstance(target, ast.Name):
    return {target.id}
  if isinstance(target, (ast.Tuple, ast.List)):
    return set().union(*(_target_names(t) for t in target.elts))
  raise BadTests(f"loop target {ast.unparse(target)[:60]} is not a name or a tuple of names")


def _literal_node(value, where):
  """An AST constant for a loop value, if it reads back as the same literal."""
  text = repr(value)
  try:
    node = pyast.parse(text, mode="eval").body
    same = ast.literal_eval(node) == value
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    same = False
  if not same:
    raise BadTests(f"{where}: the loop value {text[:60]} is not a literal")
  return node


def _bind_target(target, value, where) -> dict:
  if isinstance(target, ast.Name):
    return {target.id: _literal_node(value, where)}
  values = list(value)
  if len(values) != len(target.elts):
    raise BadTests(f"{where}: cannot unpack {repr(value)[:60]}")
  out = {}
  for t, v in zip(target.elts, values):
    out.update(_bind_target(t, v, where))
  return out


class _Substitute(ast.NodeTransformer):
  """Replaces loaded names by AST nodes (a loop value, or the `check` argument)."""

  def __init__(self, names: dict):
    self.names = names

  def visit_Name(self, node):
    if isinstance(node.ctx, ast.Load) and node.id in self.names:
      return ast.copy_location(_copy(self.names[node.id]), node)
    return node


def _copy(node):
  return ast.parse(ast.unparse(node), mode="eval").body


def _expand(statements, env: dict, functions: dict, depth=0) -> list:
  """Top-level statements with `for` loops unrolled and `check(...)` calls inlined."""
  out = []
  for node in statements:
    where = f"line {getattr(node, 'lineno', '?')}"
    if isinstance(node, ast.FunctionDef):
      args = node.args
      if (
        len(args.args) != 1
        or args.posonlyargs
        or args.kwonlyargs
        or args.vararg
        or args.kwarg
        or node.decorator_list
      ):
        raise BadTests(
          f"{where}: only `def check(candidate):` can be judged, got `def {node.name}`"
        )
      functions[node.name] = node
    elif (
      isinstance(node, ast.Expr)
      and isinstance(node.value, ast.Call)
      and isinstance(node.value.func, ast.Name)
      and node.value.func.id in functions
    ):
      call, function = node.value, functions[node.value.func.id]
      if len(call.args) != 1 or call.keywords or depth:
        raise BadTests(f"{where}: call {function.name}() with exactly one argument")
      body = [
        _Substitute({function.args.args[0].arg: call.args[0]}).visit(_copy_stmt(s))
        for s in function.body
      ]
      out.extend(_expand(body, env, {}, depth + 1))
      function.called = True
    elif isinstance(node, ast.For):
      if node.orelse or any(isinstance(n, (ast.Break, ast.Continue)) for n in ast.walk(node)):
        raise BadTests(f"{where}: `for` with else/break/continue")
      try:
        values = list(_load_time_eval(node.iter, env))
      except BadTests:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise BadTests(
          f"{where}: the loop must run over values known before the run ({type(e).__name__}: {e})"
        ) from e
      if len(values) > _MAX_UNROLLED:
        raise BadTests(f"{where}: a loop of more than {_MAX_UNROLLED} iterations")
      for value in values:
        names = _bind_target(node.target, value, where)
        body = [_Substitute(names).visit(_copy_stmt(s)) for s in node.body]
        out.extend(_expand(body, env, functions, depth))
    elif isinstance(node, (ast.Assert, ast.Import, ast.ImportFrom, ast.Assign, ast.Pass)) or (
      isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    ):
      out.append(node)
    else:
      raise BadTests(
        f"{where}: `{ast.unparse(node).splitlines()[0][:80]}` cannot be judged "
        "outside the program (use asserts, imports, assignments, for loops over "
        "literals, or check(candidate))"
      )
    if len(out) > _MAX_UNROLLED:
      raise BadTests(f"the tests expand into more than {_MAX_UNROLLED} statements")
  return out


def _copy_stmt(node):
  return ast.parse(ast.unparse(node)).body[0]


def _load_time_eval(node, env):
  """Evaluates a test expression that needs no value of the program, now."""
  splitter = _Splitter([], set(env))
  if splitter.needs_program(node, frozenset()):
    raise BadTests(f"`{ast.unparse(node)[:80]}` needs a value of the program")
  code = _code(splitter.split(node))
  return eval(code, {"__builtins__": _caller_builtins(), **env})  # pylint: disable=eval-used


def _imports(node, env: dict) -> None:
  if isinstance(node, ast.Import):
    for alias in node.names:
      root = alias.name.split(".")[0]
      if alias.name not in MODULES:
        raise BadTests(f"the tests import {alias.name}; allowed: {', '.join(sorted(MODULES))}")
      env[alias.asname or root] = MODULES[root]
    return
  if node.module not in MODULES or node.level:
    raise BadTests(f"the tests import from {node.module}; allowed: {', '.join(sorted(MODULES))}")
  for alias in node.names:
    if alias.name == "*" or not hasattr(MODULES[node.module], alias.name):
      raise BadTests(f"from {node.module} import {alias.name}")
    env[alias.asname or alias.name] = getattr(MODULES[node.module], alias.name)


def compile_tests(tests: str) -> Plan:
  """The plan of `tests` (see the module docstring); BadTests if they cannot be judged here."""
  try:
    statements = pyast.parse(tests).body
  except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
    raise BadTests(f"the tests do not parse: {e}") from e
  env, functions = {}, {}
  statements = _expand(statements, env, functions)
  uncalled = [name for name, f in functions.items() if not getattr(f, "called", False)]
  if uncalled:
    raise BadTests(
      f"the tests define {uncalled[0]}() but never call it (add e.g. `{uncalled[0]}(solution)`)"
    )
  items, steps = [], []
  splitter = _Splitter(items, set())
  for node in statements:
    splitter.known = set(env) | {s[2] for s in steps if s[0] == "bind"}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      _imports(node, env)
      items.append(["exec", ast.unparse(node)])
    elif isinstance(node, ast.Assign):
      if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
        raise BadTests(f"line {node.lineno}: assign to one name only")
      name = node.targets[0].id
      first = len(items)
      rewritten = splitter.split(node.value)
      if len(items) == first:  # known now: loops and later asserts may use it
        env[name] = _load_time_eval(node.value, env)
      steps.append(("bind", _code(rewritten), name))
      items.append(["exec", f"{name} = {ast.unparse(rewritten)}"])
    elif isinstance(node, ast.Assert):
      steps.append(("assert", _code(splitter.split(node.test)), ast.unparse(node.test)))
  if not any(s[0] == "assert" for s in steps):
    raise BadTests("the tests hold no assert statement")
  return Plan(items, steps, env)


def _code(node):
  """The caller's code of a split expression (a copy: the sandbox gets the unguarded text)."""
  guarded = _GuardBinops().visit(_copy(node))
  return compile(ast.fix_missing_locations(ast.Expression(guarded)), "<tests>", "eval")


def _decode(text):
  """A value the worker reported: a literal (with inf and nan), else a BadValue."""
  if not isinstance(text, str) or len(text) > _MAX_VALUE_CHARS:
    raise _BadValue("not a value")
  try:
    node = pyast.parse(text, mode="eval").body
    for n in ast.walk(node):
      for name, child in ast.iter_fields(n):
        if isinstance(child, ast.Name) and child.id in ("inf", "nan"):
          setattr(n, name, ast.Constant(float(child.id)))
        elif isinstance(child, list):
          child[:] = [
            ast.Constant(float(c.id)) if isinstance(c, ast.Name) and c.id in ("inf", "nan") else c
            for c in child
          ]
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
      node = ast.Constant(float(node.id))
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
    raise _BadValue(f"not a literal ({type(e).__name__})") from e


class _BadValue(Exception):
  pass


def _values(results, plan: Plan) -> tuple[dict, dict]:
  """({placeholder: value}, {placeholder: why it has none}) from the worker's results."""
  values, missing = {}, {}
  for item, result in zip(plan.items, results):
    if item[0] != "value":
      continue
    name = _PLACEHOLDER % item[1]
    if not (
      isinstance(result, list)
      and len(result) == 2
      and result[0] in ("v", "x")
      and isinstance(result[1], str)
    ):
      missing[name] = "malformed result"
    elif result[0] == "x":
      missing[name] = "raised " + result[1][:300]
    else:
      try:
        values[name] = _decode(result[1])
      except _BadValue as e:
        missing[name] = f"{item[2][:100]} gave {result[1][:100]!r}: {e}"
  for item in plan.items[len(results) :]:
    if item[0] == "value":
      missing[_PLACEHOLDER % item[1]] = "never evaluated (the run ended first)"
  return values, missing


def judge(plan: Plan, results) -> tuple[bool, str]:
  """(passed, why not): every assert of `plan` evaluated here on the reported values."""
  values, missing = _values(results, plan)
  scope = {"__builtins__": _caller_builtins(), **plan.env, **values}
  for kind, code, text in plan.steps:
    try:
      value = eval(code, scope)  # pylint: disable=eval-used
    except Exception as e:  # pylint: disable=broad-except  (values are plain data: no user code)
      if kind == "bind":  # the name stays unbound: asserts that use it fail
        scope.pop(text, None)
        continue
      name = e.name if isinstance(e, NameError) else None
      why = missing.get(name) or f"raised {type(e).__name__}: {str(e)[:200]}"
      return False, f"assert {text[:200]}: {why}"
    if kind == "bind":
      scope[text] = value
      continue
    try:
      ok = bool(value)
    except Exception:  # pylint: disable=broad-except
      ok = False
    if not ok:
      return False, f"assert {text[:200]} failed"
  return True, ""


def run_tests(source: str, tests: str, limits: sandbox.Limits = sandbox.Limits()) -> TestsResult:
  """Runs `source`, then evaluates the values `tests` need, in the sandbox; judges here.
  BadTests (a ValueError) if the tests cannot be judged outside the program."""
  plan = compile_tests(tests)
  run, records = sandbox.run_child(
    {"mode": "test", "tests": plan.items},
    source,
    limits=limits,
    record_bytes=len(plan.items) * (_MAX_VALUE_CHARS + 64) + 4096,
  )
  if run.status != "ok":  # the worker always exits 0 after its record
    return TestsResult(
      False,
      run.status,
      f"the run ended with status {run.status}: " + run.stderr.strip()[-500:],
      run,
    )
  if records.error or records.overflow:
    return TestsResult(
      False, "error", "the result channel is damaged: " + (records.error or "too many bytes"), run
    )
  if len(records.records) != 1:
    return TestsResult(
      False,
      "failed",
      f"the worker sent {len(records.records)} records "
      "(the program ended the run before the values were computed)",
      run,
    )
  record = records.records[0]
  if (
    set(record) != {"status", "results", "message"}
    or record["status"] != "ok"
    or not isinstance(record["results"], list)
    or len(record["results"]) > len(plan.items)
    or not isinstance(record["message"], str)
  ):
    return TestsResult(False, "error", f"the worker record is malformed: {str(record)[:200]}", run)
  passed, why = judge(plan, record["results"])
  if not passed:
    return TestsResult(False, "failed", why, run)
  return TestsResult(True, "pass", "", run)
