"""Generators: a prime sieve, chunking and a pipeline of generator stages."""


def primes():
  found = []
  candidate = 2
  while True:
    if all(candidate % p for p in found):
      found.append(candidate)
      yield candidate
    candidate += 1


def first_primes(k):
  result = []
  for p in primes():
    if len(result) == k:
      break
    result.append(p)
  return result


def chunks(items, size):
  for start in range(0, len(items), size):
    yield items[start : start + size]


def chunk_sums(items, size):
  return [sum(chunk) for chunk in chunks(items, size)]


def countdown(n):
  while n > 0:
    yield n
    n -= 1


INPUTS = {
  "first_primes": [(4,)],
  "chunk_sums": [([1, 2, 3, 4, 5, 6, 7], 3)],
  "countdown": [(3,)],
}
