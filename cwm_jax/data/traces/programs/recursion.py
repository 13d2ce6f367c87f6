"""Recursion: factorial, Towers of Hanoi and memoised Fibonacci."""


def factorial(n):
  if n <= 1:
    return 1
  return n * factorial(n - 1)


def hanoi(n, source="A", target="C", spare="B"):
  if n == 0:
    return []
  moves = hanoi(n - 1, source, spare, target)
  moves.append((source, target))
  moves += hanoi(n - 1, spare, target, source)
  return moves


def fib(n, memo=None):
  if memo is None:
    memo = {}
  if n < 2:
    return n
  if n not in memo:
    memo[n] = fib(n - 1, memo) + fib(n - 2, memo)
  return memo[n]


INPUTS = {
  "factorial": [(5,), (0,)],
  "hanoi": [(2,), (3,)],
  "fib": [(6,)],
}
