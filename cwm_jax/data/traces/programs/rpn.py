"""A tiny interpreter: tokenising and evaluating reverse Polish notation."""

import operator

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def tokenize(expression):
  tokens = []
  for part in expression.split():
    if part in OPERATORS:
      tokens.append(part)
    else:
      tokens.append(float(part) if "." in part else int(part))
  return tokens


def evaluate(expression):
  stack = []
  for token in tokenize(expression):
    if token in OPERATORS:
      right, left = stack.pop(), stack.pop()
      stack.append(OPERATORS[token](left, right))
    else:
      stack.append(token)
  if len(stack) != 1:
    raise ValueError(f"malformed expression, stack is {stack}")
  return stack[0]


INPUTS = {
  "evaluate": [("3 4 + 2 *",), ("5 1 2 + 4 * + 3 -",), ("1 2",)],
}
