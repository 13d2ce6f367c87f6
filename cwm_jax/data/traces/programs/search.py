"""Searching: binary search and a two-pointer pair sum on sorted lists."""


def binary_search(items, target):
  low, high = 0, len(items) - 1
  while low <= high:
    mid = (low + high) // 2
    if items[mid] == target:
      return mid
    if items[mid] < target:
      low = mid + 1
    else:
      high = mid - 1
  return -1


def pair_with_sum(items, total):
  i, j = 0, len(items) - 1
  while i < j:
    s = items[i] + items[j]
    if s == total:
      return items[i], items[j]
    if s < total:
      i += 1
    else:
      j -= 1
  return None


INPUTS = {
  "binary_search": [([1, 3, 5, 7, 9, 11], 7), ([1, 3, 5], 4)],
  "pair_with_sum": [([1, 2, 4, 7, 11, 15], 15)],
}
