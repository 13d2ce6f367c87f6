"""Closures and higher-order functions: counters, composition, memoisation."""


def make_counter(start=0):
  count = start

  def increment(step=1):
    nonlocal count
    count += step
    return count

  return increment


def use_counter(steps):
  counter = make_counter(10)
  values = [counter(s) for s in steps]
  return values


def compose(*functions):
  def composed(x):
    for f in reversed(functions):
      x = f(x)
    return x

  return composed


def pipeline(x):
  double = lambda v: v * 2
  inc = lambda v: v + 1
  return compose(double, inc)(x)


def memoize(f):
  cache = {}

  def wrapper(n):
    if n not in cache:
      cache[n] = f(n)
    return cache[n]

  return wrapper


def count_paths(n):
  @memoize
  def paths(k):
    return 1 if k <= 1 else paths(k - 1) + paths(k - 2)

  return paths(n)


INPUTS = {
  "use_counter": [([1, 2, 3],)],
  "pipeline": [(5,)],
  "count_paths": [(4,)],
}
