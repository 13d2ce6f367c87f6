"""run_tests: run a program, then its tests, in the sandbox; a pass is the harness's word only.

The worker (worker.py, mode 'test') runs the program as `__main__`, then each top-level
statement of the tests in a namespace with pristine builtins, with `assert x == <builtin
value>` requiring `x` to be a builtin value too, and sends one nonce-tagged record
{'status': 'ok', 'passed', 'total', 'message'}. The caller counts the statements itself and
believes a pass only when that record says all of them passed: an exit code, printed text,
`exit()` / `os._exit()` before or during the tests, a killed harness, or a damaged channel are
all failures.
"""

from __future__ import annotations

import ast
import dataclasses

from cwm_jax.data.traces import sandbox


@dataclasses.dataclass(frozen=True)
class TestsResult:
  passed: bool  # every test statement ran and passed
  status: str  # 'pass', 'failed' (a test failed or did not run), or the sandbox's status
  message: str
  run: sandbox.SandboxResult


def count_tests(tests: str) -> int:
  """The number of top-level statements of `tests`; ValueError if it does not parse or is empty."""
  try:
    total = len(ast.parse(tests).body)
  except SyntaxError as e:
    raise ValueError(f'the tests do not parse: {e}') from e
  if not total:
    raise ValueError('the tests are empty: give at least one assert statement')
  return total


def run_tests(source: str, tests: str, limits: sandbox.Limits = sandbox.Limits()) -> TestsResult:
  """Runs `source`, then `tests`, in the sandbox; see the module docstring."""
  total = count_tests(tests)
  run, records = sandbox.run_child({'mode': 'test', 'tests': tests}, source, limits=limits,
                                   record_bytes=1 << 16)
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
  if (set(record) != {'status', 'passed', 'total', 'message'} or record['status'] != 'ok'
      or type(record['passed']) is not int or record['total'] != total
      or not isinstance(record['message'], str) or not 0 <= record['passed'] <= total):
    return TestsResult(False, 'error', f'the harness verdict is malformed: {str(record)[:200]}',
                       run)
  if record['passed'] != total:
    return TestsResult(False, 'failed', record['message'] or
                       f'{record["passed"]} of {total} tests passed', run)
  return TestsResult(True, 'pass', '', run)
