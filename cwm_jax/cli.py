"""Shared entry-point runner: absl flags, with every bad input exiting 2."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from cwm_jax.base import ConfigError


def _parse_or_exit(argv: list[str]) -> list[str]:
  """Parses flags (config files included); a bad flag or config exits 2, not 1."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ConfigError, AttributeError, KeyError, TypeError, ValueError) as e:
    cause = e.__cause__ or e
    print(f"error: {type(cause).__name__}: {cause}\n"
          f"Pass --helpfull to see the flags; fix the flag or config field named above.",
          file=sys.stderr)
    sys.exit(2)


def run_main(main: Callable[[list[str]], None], errors: tuple[type, ...] = ()) -> None:
  """`app.run(main)` where bad flags, bad configs (`ConfigError`), missing files and
  `errors` raised by `main` print one line and exit 2."""
  def guarded(argv):
    try:
      return main(argv)
    except (ConfigError, FileNotFoundError, *errors) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded, flags_parser=_parse_or_exit)
