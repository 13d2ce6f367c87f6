"""Arithmetic: Euclid's gcd, a sieve of Eratosthenes and base conversion."""


def gcd(a, b):
  while b:
    a, b = b, a % b
  return a


def sieve(limit):
  is_prime = [True] * (limit + 1)
  is_prime[0] = is_prime[1] = False
  for n in range(2, int(limit**0.5) + 1):
    if is_prime[n]:
      for multiple in range(n * n, limit + 1, n):
        is_prime[multiple] = False
  return [n for n, prime in enumerate(is_prime) if prime]


def to_base(n, base):
  digits = "0123456789abcdef"
  if n == 0:
    return "0"
  out = ""
  while n > 0:
    n, r = divmod(n, base)
    out = digits[r] + out
  return out


INPUTS = {
  "gcd": [(48, 18)],
  "sieve": [(20,)],
  "to_base": [(255, 16), (10, 2)],
}
