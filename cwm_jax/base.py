"""Types shared by every layer of cwm_jax; imports nothing from the package.

`ConfigError` is raised for any invalid user input (a config field, a flag, a
file of the wrong kind); its message names the problem and the fix, and the
command-line programs turn it into exit code 2.
"""

import importlib


class ConfigError(ValueError):
  """A configuration is invalid; the message names the fields and the fix."""


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
