"""Python execution traces in CWM's format, and the sandbox that runs untrusted code.

trace_call(source, function, args, kwargs, limits) -> TraceResult(status, frames, message)
format_prompt / format_frames / format_trace / parse_frames / resolve_locals
run_python(source, stdin=, limits=) -> SandboxResult(status, stdout, stderr, returncode)
run_tests(source, tests, limits=) -> TestsResult(passed, status, message, run)
SandboxRefused: no network isolation here and no Limits(allow_no_isolation=True)
CgroupUnavailable: Limits(cgroup='v2' / 'v1') where the host does not offer that hierarchy
trace_examples / program_calls / doctest_calls: real functions with real inputs.
"""

from cwm_jax.data.traces.driver import TRACE_STATUSES, TraceResult, trace_call
from cwm_jax.data.traces.examples import (
  DOCTEST_MODULES,
  PROGRAMS_DIR,
  Call,
  doctest_calls,
  program_calls,
  program_inputs,
  trace_examples,
)
from cwm_jax.data.traces.format import (
  SPECIAL_TOKENS,
  START_MARKER,
  format_frames,
  format_prompt,
  format_trace,
  parse_frames,
  resolve_locals,
)
from cwm_jax.data.traces.harness import TestsResult, run_tests
from cwm_jax.data.traces.sandbox import (
  CgroupUnavailable,
  Limits,
  SandboxRefused,
  SandboxResult,
  run_python,
)
from cwm_jax.data.traces.tracer import TRUNCATION_MARKER, encode_value

__all__ = [
  "Call",
  "CgroupUnavailable",
  "DOCTEST_MODULES",
  "Limits",
  "PROGRAMS_DIR",
  "SPECIAL_TOKENS",
  "START_MARKER",
  "SandboxRefused",
  "SandboxResult",
  "TRACE_STATUSES",
  "TRUNCATION_MARKER",
  "TestsResult",
  "TraceResult",
  "doctest_calls",
  "encode_value",
  "format_frames",
  "format_prompt",
  "format_trace",
  "parse_frames",
  "program_calls",
  "program_inputs",
  "resolve_locals",
  "run_python",
  "run_tests",
  "trace_call",
  "trace_examples",
]
