"""Trace one call of a Python function in CWM's execution-trace format.

  python -m cwm_jax.trace FILE.py:FUNCTION --args '(1, "a")' [--kwargs '{}'] [--format json]
  python -m cwm_jax.trace --sandbox_info

Prints the trace document (prompt with the `# << START_OF_TRACE` marker, then the
frames) or, with --format json, a JSON list of frames. The call runs in the
sandbox (cwm_jax.data.traces.sandbox). Exit codes: 0 traced, 1 the sandbox
reported a limit or an error (status on stderr), 2 bad arguments (a program that is not a
regular UTF-8 file of at most 1 MiB, literals that do not parse or exhaust the parser, limits
out of range), or no network isolation on this machine without --allow_no_isolation; every
exit 2 is one line on stderr. --sandbox_info prints, as
JSON, the isolation this machine allows.
"""

import json
import sys

from absl import app, flags

from cwm_jax.cli import run_main
from cwm_jax.data import traces
from cwm_jax.data.traces import driver, isolation

_ARGS = flags.DEFINE_string("args", "()", "positional arguments: a Python literal tuple")
_KWARGS = flags.DEFINE_string("kwargs", "{}", "keyword arguments: a Python literal dict")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "output format")
_TIMEOUT = flags.DEFINE_float("timeout_s", 10.0, "wall-clock limit of the traced run")
_MEMORY = flags.DEFINE_integer("memory_mb", 1024, "address-space limit of the traced run")
_INFO = flags.DEFINE_bool(
  "sandbox_info", False, "print the isolation this machine allows, as JSON, and exit"
)
_NAMESPACES = flags.DEFINE_bool(
  "namespaces",
  True,
  "run the program in fresh PID, mount and network namespaces (where the kernel allows)",
)
_ALLOW = flags.DEFINE_bool(
  "allow_no_isolation",
  False,
  "run even where the network cannot be isolated (namespaces unavailable); refused otherwise",
)


def _literal(text, kind, flag):
  try:
    value = driver.parse_literal(text, f"--{flag}")
  except ValueError as e:
    raise app.UsageError(str(e), exitcode=2) from None
  if not isinstance(value, kind):
    raise app.UsageError(
      f"--{flag} must be a {kind.__name__} literal such as "
      f"{'(1,)' if kind is tuple else '{}'}; got {text[:80]!r}",
      exitcode=2,
    )
  return value


def main(argv):
  if _INFO.value:
    print(json.dumps(isolation.probe().describe(), indent=1))
    return 0
  if len(argv) != 2 or ":" not in argv[1]:
    raise app.UsageError("give exactly one FILE.py:FUNCTION", exitcode=2)
  path, function = argv[1].rsplit(":", 1)
  args = _literal(_ARGS.value, tuple, "args")
  kwargs = _literal(_KWARGS.value, dict, "kwargs")
  try:
    source = driver.read_program(path)
    limits = traces.Limits(
      timeout_s=_TIMEOUT.value,
      memory_mb=_MEMORY.value,
      namespaces=_NAMESPACES.value,
      allow_no_isolation=_ALLOW.value,
    )
    result = traces.trace_call(source, function, args, kwargs, limits)
  except (OSError, ValueError, SyntaxError) as e:
    raise app.UsageError(str(e), exitcode=2) from None
  if result.status != "ok":
    print(f"trace {result.status}: {result.message}", file=sys.stderr)
    return 1
  if _FORMAT.value == "json":
    print(json.dumps(result.frames, indent=1, ensure_ascii=False))
  else:
    print(traces.format_trace(source, function, result.frames))
  if result.message:
    print(result.message, file=sys.stderr)
  return 0


def run():
  run_main(main)


if __name__ == "__main__":
  run()
