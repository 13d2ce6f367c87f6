"""Graphs: breadth-first shortest path and depth-first topological sort."""

from collections import deque


def shortest_path(edges, start, goal):
  graph = {}
  for a, b in edges:
    graph.setdefault(a, []).append(b)
    graph.setdefault(b, []).append(a)
  previous = {start: None}
  queue = deque([start])
  while queue:
    node = queue.popleft()
    if node == goal:
      break
    for nxt in graph.get(node, []):
      if nxt not in previous:
        previous[nxt] = node
        queue.append(nxt)
  if goal not in previous:
    return None
  path = [goal]
  while previous[path[-1]] is not None:
    path.append(previous[path[-1]])
  return path[::-1]


def topological_order(deps):
  order, seen = [], set()

  def visit(node):
    if node in seen:
      return
    seen.add(node)
    for dep in deps.get(node, []):
      visit(dep)
    order.append(node)

  for node in sorted(deps):
    visit(node)
  return order


INPUTS = {
  "shortest_path": [([("a", "b"), ("b", "c"), ("a", "d"), ("d", "c"), ("c", "e")], "a", "e")],
  "topological_order": [({"app": ["lib", "utils"], "lib": ["utils"], "utils": []},)],
}
