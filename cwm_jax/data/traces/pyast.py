"""Python's parser for code that runs in worker threads (trace building, rewards).

CPython 3.11 keeps the AST constructor's recursion depth in interpreter-wide state
and resets it at the start of every parse, so two threads parsing at once can fail
with `SystemError: AST constructor recursion depth mismatch` (python/cpython#106905;
seen once in a trace-build test under load). Parses here take one lock.
"""

from __future__ import annotations

import ast
import threading

_LOCK = threading.Lock()


def parse(source: str, mode: str = "exec") -> ast.AST:
  """`ast.parse`, one thread at a time."""
  with _LOCK:
    return ast.parse(source, mode=mode)


def literal_eval(text: str):
  """`ast.literal_eval` of a string, parsed under the same lock."""
  return ast.literal_eval(parse(text.lstrip(" \t"), mode="eval"))
