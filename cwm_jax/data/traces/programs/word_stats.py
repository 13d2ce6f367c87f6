"""Dictionaries: word frequencies, anagram groups and inverting a mapping."""


def word_frequencies(text):
  counts = {}
  for word in text.lower().split():
    word = word.strip(".,!?")
    if word:
      counts[word] = counts.get(word, 0) + 1
  return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def group_anagrams(words):
  groups = {}
  for word in words:
    key = "".join(sorted(word))
    groups.setdefault(key, []).append(word)
  return list(groups.values())


def invert(mapping):
  inverted = {}
  for key, value in mapping.items():
    inverted.setdefault(value, set()).add(key)
  return inverted


INPUTS = {
  "word_frequencies": [("The cat and the hat. The end!",)],
  "group_anagrams": [(["eat", "tea", "tan", "ate", "nat", "bat"],)],
  "invert": [({"a": 1, "b": 2, "c": 1},)],
}
