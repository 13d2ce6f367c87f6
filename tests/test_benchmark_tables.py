"""docs/performance.md's generated tables equal what benchmarks/tables.py renders from the
newest records under benchmarks/results/NAME/ (rerun `python benchmarks/tables.py` after a
benchmark's `--save`)."""

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


def _docs_text(tables) -> str:
  out = []
  for doc in tables.DOCS:
    with open(doc) as f:
      out.append(f.read())
  return "\n".join(out)


def test_performance_doc_equals_the_rendered_results():
  tables = _tables()
  for doc in tables.DOCS:
    with open(doc) as f:
      text = f.read()
    assert "<!-- tables:" in text, doc
    assert tables.render(text) == text, f"{doc}: run python benchmarks/tables.py"


def test_every_renderer_has_a_block_and_a_record():
  tables = _tables()
  text = _docs_text(tables)
  for block in tables.RENDERERS:
    assert f"<!-- tables:{block} -->" in text, block
    name = tables.FROM_RECORD.get(block, (block,))[0]
    record = tables.results_io.latest(name)
    assert record["name"] == name and "result" in record, name
    assert record["date"] and record["commit"], name
    source = tables.source_line(name, record)
    assert source in text, f"{name}: the doc does not name its record ({source.strip()})"


def test_a_block_without_a_record_is_an_error(tmp_path):
  tables = _tables()
  with pytest.raises(ValueError, match="missing_bench"):
    tables.render("<!-- tables:missing_bench -->\n<!-- /tables:missing_bench -->", str(tmp_path))
  # A renderer without any record of its name is an error too, not an empty table.
  with pytest.raises(ValueError, match="traces"):
    tables.render("<!-- tables:traces -->\n<!-- /tables:traces -->", str(tmp_path))


def test_the_newest_record_is_rendered_with_its_source(tmp_path):
  tables = _tables()
  result = {
    "calls": 2,
    "statuses": {"ok": 2},
    "seconds": 0.5,
    "traces_per_s": 4.0,
    "frames_mean": 3.0,
    "frames_max": 4,
    "trace_bytes_mean": 1234,
    "run_python_empty_s": 0.02,
    "namespaces": True,
  }
  old = {"name": "traces", "date": "2026-01-01T00:00:00Z", "machine": None, "commit": "a" * 40}
  new = dict(old, date="2026-02-01T00:00:00Z", commit="b" * 40, dirty=False)
  new["machine"] = {"cpu": "Some CPU", "cpu_count": 2, "python": "3.11", "system": "Linux"}
  for rec, rate in ((old, 1.0), (new, 4.0)):
    tables.results_io.write(dict(rec, result=dict(result, traces_per_s=rate)), str(tmp_path))
  out = tables.render("<!-- tables:traces -->\n<!-- /tables:traces -->", str(tmp_path))
  assert "| 4.0 |" in out and "| 1.0 |" not in out
  assert "`benchmarks/results/traces/2026-02-01T000000Z.json`" in out
  assert "commit `bbbbbbbbbb`" in out and "Some CPU, 2 cores" in out
  migrated = dict(old, migrated_from="benchmarks/results/traces.json", result=result)
  line = tables.source_line("traces", migrated)
  assert "machine: not recorded" in line and "benchmarks/results/traces.json" in line


def test_a_series_block_renders_the_newest_record_of_each_configuration(tmp_path):
  tables = _tables()
  base = {
    "mesh": "fsdp=1",
    "devices": 1,
    "tokens_per_sec": 1.0,
    "step_time_ms": 2.0,
    "mfu": 0.01,
    "first_step_s": 3.0,
    "batch_size": 8,
    "seq_len": 64,
    "steps": 30,
    "load_avg_1m": 1.0,
  }
  runs = [
    ("2026-01-01T00:00:00Z", dict(base, tokens_per_sec=111.0)),
    ("2026-01-02T00:00:00Z", dict(base, devices=8, mesh="fsdp=8", tokens_per_sec=888.0)),
    ("2026-01-03T00:00:00Z", dict(base, tokens_per_sec=222.0)),
  ]
  for date, result in runs:
    rec = {"name": "train_loop", "date": date, "machine": None, "commit": "c" * 40}
    tables.results_io.write(dict(rec, result=result), str(tmp_path))
  out = tables.render("<!-- tables:train_loop -->\n<!-- /tables:train_loop -->", str(tmp_path))
  assert "| 222.0 |" in out and "| 888.0 |" in out and "| 111.0 |" not in out
  assert "2026-01-02T000000Z.json" in out and "2026-01-03T000000Z.json" in out
  assert "2026-01-01T000000Z.json" not in out


def test_a_figure_migrated_from_the_doc_names_the_machine_it_described():
  tables = _tables()
  rec = {
    "name": "gpu_mfu",
    "date": "2026-01-01T00:00:00Z",
    "machine": None,
    "commit": "d" * 40,
    "migrated_from": "docs/performance.md",
    "machine_described": "1 x NVIDIA H200",
  }
  line = tables.source_line("gpu_mfu", rec)
  assert "described it as 1 x NVIDIA H200" in line
  assert "Migrated from `docs/performance.md`" in line and "wrote the figures" in line
