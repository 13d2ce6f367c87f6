"""Types shared by every layer of cwm_jax; imports nothing from the package.

`ConfigError` is raised for any invalid user input (a config field, a flag, a
file of the wrong kind); its message names the problem and the fix, and the
command-line programs turn it into exit code 2.
"""


class ConfigError(ValueError):
  """A configuration is invalid; the message names the fields and the fix."""


class NonFiniteError(RuntimeError):
  """Training stopped on a non-finite loss or gradient norm (the last good checkpoint is
  kept); programs exit with `exit_code`."""
  exit_code = 3
