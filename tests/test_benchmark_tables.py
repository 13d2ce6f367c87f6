"""docs/performance.md's generated tables equal what benchmarks/tables.py renders from the
results under benchmarks/results/ (rerun `python benchmarks/tables.py` after a new result)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tables():
  spec = importlib.util.spec_from_file_location(
    "benchmark_tables", os.path.join(ROOT, "benchmarks", "tables.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_performance_doc_equals_the_rendered_results():
  tables = _tables()
  with open(tables.DOC) as f:
    text = f.read()
  assert "<!-- tables:" in text
  assert tables.render(text) == text, "run: python benchmarks/tables.py"


def test_every_results_file_with_a_renderer_has_a_block():
  tables = _tables()
  with open(tables.DOC) as f:
    text = f.read()
  for name in tables.RENDERERS:
    assert f"<!-- tables:{name} -->" in text, name
    assert os.path.exists(os.path.join(tables.RESULTS, f"{name}.json")), name


def test_a_block_without_a_results_file_is_an_error(tmp_path):
  tables = _tables()
  with pytest.raises(ValueError, match="missing_bench"):
    tables.render("<!-- tables:missing_bench -->\n<!-- /tables:missing_bench -->", str(tmp_path))
