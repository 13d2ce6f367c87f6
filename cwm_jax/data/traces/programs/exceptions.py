"""Exceptions: caught and re-raised, custom errors, finally blocks, uncaught errors."""


class ParseError(ValueError):
  pass


def parse_pairs(text):
  pairs = {}
  for number, item in enumerate(text.split(";"), 1):
    if not item.strip():
      continue
    key, sep, value = item.partition("=")
    if not sep:
      raise ParseError(f"item {number} has no '=': {item!r}")
    pairs[key.strip()] = value.strip()
  return pairs


def safe_ratios(pairs):
  ratios = []
  for a, b in pairs:
    try:
      ratios.append(a / b)
    except ZeroDivisionError:
      ratios.append(None)
    finally:
      last = (a, b)
  return ratios, last


def checked_average(values):
  if not values:
    raise ValueError("average of an empty list")
  return sum(values) / len(values)


INPUTS = {
  "parse_pairs": [("a=1; b = 2;",), ("x=1;y",)],
  "safe_ratios": [([(1, 2), (3, 0), (5, 4)],)],
  "checked_average": [([2, 4, 9],), ([],)],
}
