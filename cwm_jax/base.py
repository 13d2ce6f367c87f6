"""Types shared by every layer of cwm_jax; imports nothing from the package.

`ConfigError` is raised for any invalid user input (a config field, a flag, a
file of the wrong kind); its message names the problem and the fix, and the
command-line programs turn it into exit code 2. `check_fields` is the one check of names
a section does not know (it words the error the same way everywhere).
"""

import importlib
from collections.abc import Iterable


class ConfigError(ValueError):
  """A configuration is invalid; the message names the fields and the fix."""


def unknown_fields(
  given: Iterable[str], known: Iterable[str], where: str = "", what: str = "fields", fix: str = ""
) -> str:
  """'' when every name in `given` is in `known`; else a message naming the unknown ones and
  the known ones: '{where}: unknown {what} [...]; known: [...]' (then '; {fix}' if given).

  The one strict-fields check of the package: every config section, spec line or flag that
  rejects names it does not know words its error this way."""
  known = sorted(set(known))
  unknown = sorted(set(given) - set(known))
  if not unknown:
    return ""
  lead = f"{where}: " if where else ""
  return f"{lead}unknown {what} {unknown}; known: {known}" + (f"; {fix}" if fix else "")


def check_fields(
  given: Iterable[str],
  known: Iterable[str],
  where: str = "",
  what: str = "fields",
  fix: str = "",
  error: type[Exception] = ConfigError,
) -> None:
  """Raises `error` (a ConfigError unless told) with `unknown_fields`'s message when `given`
  holds a name not in `known`."""
  message = unknown_fields(given, known, where, what, fix)
  if message:
    raise error(message)


class NonFiniteError(RuntimeError):
  """Training stopped on a non-finite loss or gradient norm (the last good checkpoint is
  kept); programs exit with `exit_code`."""

  exit_code = 3


def require_extra(module: str, extra: str, purpose: str):
  """Imports and returns `module`, an optional dependency installed by the package's `extra`;
  when it is missing, a ConfigError saying how to install it (so the programs exit 2)."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ConfigError(
      f"{purpose} needs {e.name!r}, which is not installed: pip install "
      f"'cwm_jax[{extra}]' (or: bash launch/install.sh .venv {extra})"
    ) from None
