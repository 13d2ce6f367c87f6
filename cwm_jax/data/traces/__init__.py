"""Python execution traces in CWM's format, and the sandbox that runs untrusted code.

  trace_call(source, function, args, kwargs, limits) -> TraceResult(status, frames, message)
  format_prompt / format_frames / format_trace / parse_frames / resolve_locals
  run_python(source, stdin=, limits=) -> SandboxResult(status, stdout, stderr, returncode)
  trace_examples / program_calls / doctest_calls: real functions with real inputs.
"""

from cwm_jax.data.traces.driver import TRACE_STATUSES, TraceResult, trace_call
from cwm_jax.data.traces.examples import (DOCTEST_MODULES, PROGRAMS_DIR, Call, doctest_calls,
                                          program_calls, program_inputs, trace_examples)
from cwm_jax.data.traces.format import (SPECIAL_TOKENS, START_MARKER, format_frames, format_prompt,
                                        format_trace, parse_frames, resolve_locals)
from cwm_jax.data.traces.sandbox import Limits, SandboxResult, run_python
from cwm_jax.data.traces.tracer import TRUNCATION_MARKER, encode_value

__all__ = [
    'Call', 'DOCTEST_MODULES', 'Limits', 'PROGRAMS_DIR', 'SPECIAL_TOKENS', 'START_MARKER',
    'SandboxResult', 'TRACE_STATUSES', 'TRUNCATION_MARKER', 'TraceResult', 'doctest_calls',
    'encode_value', 'format_frames', 'format_prompt', 'format_trace', 'parse_frames',
    'program_calls', 'program_inputs', 'resolve_locals', 'run_python', 'trace_call',
    'trace_examples',
]
