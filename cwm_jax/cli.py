"""Shared entry-point runner of every program: absl flags, and the exit codes.

Exit codes (README "Error handling"): 0 success (and --help); 2 any user error (a bad
flag, a config file that is missing, fails to import or to build, a config
field out of range, a missing or corrupt checkpoint, data or tokenizer file),
reported as ONE line on stderr naming the flag or field and the fix, before
anything is created; 3 a training run stopped on a non-finite loss or
gradient norm (`base.NonFiniteError`; the last good checkpoint is kept);
1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from cwm_jax import host_memory
from cwm_jax.base import ConfigError

_FIX = "run with --helpfull to see the flags"


def one_line(text: str) -> str:
  """A (possibly multi-line, possibly traceback-bearing) message as one line."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  if any(l.startswith("Traceback (most recent call last)") for l in lines):
    lines = lines[-1:]  # 'pkg.module.SomeError: message'
    lines[0] = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[0])
  return " ".join(lines)


def fail(message: str, code: int = 2) -> None:
  """Prints `error: MESSAGE` as one line on stderr and exits with `code` at once: library
  threads (orbax's event loops after a failed read) get no chance to print teardown noise."""
  sys.stdout.flush()
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


def _config_flags() -> list[str]:
  return [
    name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)
  ]


def _flag_args(argv: list[str], name: str) -> list[str]:
  """Values given to --NAME (either `--NAME=V` or `--NAME V`) in argv."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      out.append(arg.split("=", 1)[1])
    elif arg == f"--{name}" and i + 1 < len(argv):
      out.append(argv[i + 1])
  return out


def check_config_file(flag: str, value: str) -> None:
  """`--FLAG=FILE[:ARGS]` names a readable Python file that compiles; else ConfigError."""
  path = value.split(":", 1)[0]
  if not path:
    raise ConfigError(f"--{flag} is empty; pass a config file such as configs/smoke.py")
  if not os.path.isfile(path):
    raise ConfigError(
      f"--{flag}: config file {path!r} not found (or not a file); pass an "
      "existing config file such as configs/smoke.py"
    )
  try:
    with open(path, encoding="utf-8") as f:
      compile(f.read(), path, "exec")
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"--{flag}: cannot read config file {path!r}: {e}") from None
  except SyntaxError as e:
    raise ConfigError(
      f"--{flag}: config file {path} line {e.lineno}: {e.msg}; fix the syntax error"
    ) from None


def _check_config_values(names: list[str]) -> None:
  """After parsing: each config flag holds a ConfigDict (not a load error, not another type)."""
  for name in names:
    value = flags.FLAGS[name].value
    if value is None:
      continue
    if type(value).__name__ == "_ErrorConfig":
      err = object.__getattribute__(value, "_error")
      raise ConfigError(f"--{name}: {one_line(err)}")
    if not isinstance(value, ConfigDict):
      raise ConfigError(
        f"--{name}: get_config() returned {type(value).__name__}; it must return "
        "an ml_collections.ConfigDict"
      )


def _check_float_flags() -> None:
  """Every float flag holds a finite number (`--timeout_s inf`, `--temperature nan` are
  user errors, not crashes deep inside the program)."""
  for name in sorted(flags.FLAGS):
    value = flags.FLAGS[name].value
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"--{name}={value} must be a finite number")


def _root_message(e: BaseException) -> str:
  """The message of the first ConfigError in e's cause chain, else of e itself."""
  seen, cur = set(), e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, ConfigError):
      return str(cur)
    cur = cur.__cause__ or cur.__context__
  return str(e.__cause__ or e)


def _flag_error(e: BaseException) -> str:
  """One line for a flag-parsing failure; an unknown config field is named as such."""
  root = e
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  if isinstance(root, KeyError):
    return (
      f"no config field {root}: check the spelling of the --config.FIELD=VALUE "
      "overrides against the config file"
    )
  return one_line(_root_message(e))


# absl's help flags: they print the usage and end the process (with status 1, as if it failed).
_HELP_FLAGS = frozenset(
  f"{dash}{name}"
  for dash in ("-", "--")
  for name in ("?", "help", "helpshort", "helpfull", "helpxml")
)


def _asks_help(argv: list[str]) -> bool:
  """Whether argv (before a literal `--`) holds one of absl's help flags."""
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  return any(a in _HELP_FLAGS for a in args)


def _show_program_help(main: Callable) -> None:
  """Makes absl's --help describe the program, also when started as a console script.

  absl's usage prints the docstring of `__main__` and the key flags of the module named by
  sys.argv[0]. Under `python -m cwm_jax.X` both are the program's; under the installed
  `cwm-X` script, `__main__` is pip's wrapper (no docstring) and the program's flags are
  registered under its module name, so --help would list no flags at all.
  """
  program = sys.modules.get(main.__module__)
  wrapper = sys.modules["__main__"]
  if program is None or program is wrapper:
    return
  wrapper.__doc__ = program.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(program.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _parse_or_exit(argv: list[str]) -> list[str]:
  """Parses flags (config files included); a bad flag or config exits 2 with one line;
  --help (and --helpfull, ...) prints the usage and exits 0."""
  names = _config_flags()
  try:
    for name in names:
      for value in _flag_args(argv, name):
        check_config_file(name, value)
    try:
      rest = flags.FLAGS(argv)
    except SystemExit as e:
      if e.code == 1 and _asks_help(argv):
        sys.stdout.flush()
        sys.exit(0)  # asked for and printed: not a failure
      raise
    except Exception as e:  # pylint: disable=broad-except  (flag values are user input)
      raise ConfigError(
        f"{_flag_error(e)} ({_FIX}; fix the flag or config field named here)"
      ) from None
    _check_config_values(names)
    _check_float_flags()
    return rest
  except ConfigError as e:
    fail(str(e))


def run_main(
  main: Callable[[list[str]], None], errors: tuple[type, ...] = (), quiet: bool = True
) -> None:
  """`app.run(main)` where bad flags, bad configs (`ConfigError`), missing files, usage
  errors and `errors` raised by `main` print one line and exit 2, and an exception with
  an `exit_code` (a non-finite training stop) prints one line and exits with it.

  `quiet`: library INFO logs (orbax's) are off unless --verbosity is given. On a CPU
  run, host memory is retained for reuse between executions (`host_memory.retain`).
  """

  def guarded(argv):
    if quiet and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      host_memory.retain()  # before JAX starts its thread pools
      return main(argv)
    except (
      ConfigError,
      FileNotFoundError,
      NotADirectoryError,
      IsADirectoryError,
      app.UsageError,
      *errors,
    ) as e:
      fail(_root_message(e))
    except Exception as e:  # pylint: disable=broad-except
      code = getattr(e, "exit_code", None)
      if not isinstance(code, int):
        raise
      fail(str(e), code)

  _show_program_help(main)
  app.run(guarded, flags_parser=_parse_or_exit)
