"""Text layout: greedy word wrapping and column alignment."""


def wrap(text, width):
  lines, current = [], ""
  for word in text.split():
    candidate = word if not current else current + " " + word
    if len(candidate) <= width:
      current = candidate
    else:
      if current:
        lines.append(current)
      current = word
  if current:
    lines.append(current)
  return lines


def align(rows):
  widths = [max(len(str(cell)) for cell in column) for column in zip(*rows)]
  return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


INPUTS = {
  "wrap": [("the quick brown fox jumps over the lazy dog", 10)],
  "align": [([("name", "qty"), ("apple", 3), ("kiwi", 12)],)],
}
