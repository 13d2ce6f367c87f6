"""Loops and branches: the classic FizzBuzz and a running-maximum scan."""


def fizzbuzz(n):
  out = []
  for i in range(1, n + 1):
    if i % 15 == 0:
      out.append("FizzBuzz")
    elif i % 3 == 0:
      out.append("Fizz")
    elif i % 5 == 0:
      out.append("Buzz")
    else:
      out.append(str(i))
  return out


def running_max(values):
  best = None
  result = []
  for v in values:
    if best is None or v > best:
      best = v
    result.append(best)
  return result


INPUTS = {
  "fizzbuzz": [(5,), (15,)],
  "running_max": [([3, 1, 4, 1, 5, 9, 2, 6],), ([],)],
}
