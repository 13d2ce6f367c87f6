"""Nested lists: transpose, matrix product and spiral order."""


def transpose(matrix):
  return [list(row) for row in zip(*matrix)]


def matmul(a, b):
  columns = transpose(b)
  return [[sum(x * y for x, y in zip(row, col)) for col in columns] for row in a]


def spiral(matrix):
  order = []
  while matrix:
    order += matrix.pop(0)
    matrix = transpose(matrix)[::-1]
  return order


INPUTS = {
  "matmul": [([[1, 2], [3, 4]], [[5, 6], [7, 8]])],
  "spiral": [([[1, 2, 3], [4, 5, 6], [7, 8, 9]],)],
}
