"""run_tests: run a program, then its tests, in the sandbox; a pass is the harness's word only.

The tests are top-level statements (asserts). Each `assert EXPR == LITERAL` becomes a value
item: the worker (worker.py, mode 'test') evaluates EXPR and returns the repr of its value,
which must be a builtin value; the expected LITERAL never leaves this process, and the
comparison happens here on the value read back with `ast.literal_eval`, so no code in the
sandbox (always-equal objects, patched builtins, a forged verdict) can make a wrong value pass.
Every other statement runs in the worker with pristine builtins (`assert x == <builtin value>`
inside it requires a builtin `x` too) and only reports that it ran. A pass needs one
nonce-tagged record whose results cover every statement; an exit code, printed text,
`exit()` / `os._exit()` before or during the tests, a killed harness or a damaged channel
are failures.
"""

from __future__ import annotations

import ast
import dataclasses

from cwm_jax.data.traces import pyast
from cwm_jax.data.traces import sandbox

_MAX_VALUE_CHARS = 100_000  # a returned value's repr longer than this fails its test


@dataclasses.dataclass(frozen=True)
class TestsResult:
  __test__ = False  # not a pytest class
  passed: bool  # every test statement ran and passed
  status: str  # 'pass', 'failed' (a test failed or did not run), or the sandbox's status
  message: str
  run: sandbox.SandboxResult


def split_tests(tests: str) -> tuple[list[list[str]], list]:
  """(items for the worker, expected values: a literal for a value item, None for a statement);
  ValueError if `tests` does not parse or holds no statement."""
  try:
    statements = pyast.parse(tests).body
  except SyntaxError as e:
    raise ValueError(f'the tests do not parse: {e}') from e
  if not statements:
    raise ValueError('the tests are empty: give at least one assert statement')
  items, expected = [], []
  for node in statements:
    value = _literal_expectation(node)
    if value is _NO_LITERAL:
      items.append(['exec', ast.unparse(node)])
      expected.append(None)
    else:
      items.append(['value', ast.unparse(node.test.left)])
      expected.append(value)
  return items, expected


_NO_LITERAL = object()


def _literal_expectation(node):
  """The literal Y of `assert X == Y` (no message), else _NO_LITERAL."""
  test = getattr(node, 'test', None)
  if not (isinstance(node, ast.Assert) and node.msg is None and isinstance(test, ast.Compare)
          and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
    return _NO_LITERAL
  try:
    return ast.literal_eval(test.comparators[0])
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return _NO_LITERAL


def _value_matches(text, expected) -> bool:
  if not isinstance(text, str) or len(text) > _MAX_VALUE_CHARS:
    return False
  try:
    value = pyast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return False
  return value == expected


def run_tests(source: str, tests: str, limits: sandbox.Limits = sandbox.Limits()) -> TestsResult:
  """Runs `source`, then `tests`, in the sandbox; see the module docstring."""
  items, expected = split_tests(tests)
  run, records = sandbox.run_child({'mode': 'test', 'tests': items}, source, limits=limits,
                                   record_bytes=len(items) * (_MAX_VALUE_CHARS + 64) + 4096)
  if run.status != 'ok':  # the harness always exits 0 after its verdict
    return TestsResult(False, run.status, f'the run ended with status {run.status}: '
                       + run.stderr.strip()[-500:], run)
  if records.error or records.overflow:
    return TestsResult(False, 'error', 'the result channel is damaged: '
                       + (records.error or 'too many bytes'), run)
  if len(records.records) != 1:
    return TestsResult(False, 'failed', f'the harness sent {len(records.records)} verdicts '
                       '(the program ended the run before its tests finished)', run)
  record = records.records[0]
  if (set(record) != {'status', 'results', 'message'} or record['status'] != 'ok'
      or not isinstance(record['results'], list) or len(record['results']) > len(items)
      or not isinstance(record['message'], str)):
    return TestsResult(False, 'error', f'the harness verdict is malformed: {str(record)[:200]}',
                       run)
  results = record['results']
  for i, (result, want) in enumerate(zip(results, expected)):
    ok = result is True if items[i][0] == 'exec' else _value_matches(result, want)
    if not ok:
      return TestsResult(False, 'failed', f'test {i + 1} failed: {items[i][1][:200]} gave '
                         f'{str(result)[:200]}', run)
  if len(results) != len(items):
    return TestsResult(False, 'failed', record['message'] or
                       f'{len(results)} of {len(items)} tests ran', run)
  return TestsResult(True, 'pass', '', run)
