"""String algorithms: run-length encoding, Caesar cipher, palindromes."""


def run_length(text):
  if not text:
    return ""
  parts = []
  current, count = text[0], 1
  for ch in text[1:]:
    if ch == current:
      count += 1
    else:
      parts.append(f"{count}{current}")
      current, count = ch, 1
  parts.append(f"{count}{current}")
  return "".join(parts)


def caesar(text, shift):
  result = []
  for ch in text:
    if ch.isalpha():
      base = ord("a") if ch.islower() else ord("A")
      ch = chr((ord(ch) - base + shift) % 26 + base)
    result.append(ch)
  return "".join(result)


def is_palindrome(text):
  letters = [c.lower() for c in text if c.isalnum()]
  left, right = 0, len(letters) - 1
  while left < right:
    if letters[left] != letters[right]:
      return False
    left += 1
    right -= 1
  return True


INPUTS = {
  "run_length": [("aaabccdddd",), ("",)],
  "caesar": [("Hello, World", 3)],
  "is_palindrome": [("A man, a plan, a canal: Panama",), ("abca",)],
}
