"""Sorting: insertion sort in place and a recursive merge sort."""


def insertion_sort(items):
  items = list(items)
  for i in range(1, len(items)):
    key = items[i]
    j = i - 1
    while j >= 0 and items[j] > key:
      items[j + 1] = items[j]
      j -= 1
    items[j + 1] = key
  return items


def merge(left, right):
  merged = []
  i = j = 0
  while i < len(left) and j < len(right):
    if left[i] <= right[j]:
      merged.append(left[i])
      i += 1
    else:
      merged.append(right[j])
      j += 1
  return merged + left[i:] + right[j:]


def merge_sort(items):
  if len(items) <= 1:
    return items
  middle = len(items) // 2
  return merge(merge_sort(items[:middle]), merge_sort(items[middle:]))


INPUTS = {
  "insertion_sort": [([5, 2, 4, 6, 1, 3],)],
  "merge_sort": [([38, 27, 43, 3, 9],)],
}
