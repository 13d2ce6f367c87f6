"""benchmarks/attention_memory.py's check: it names the lengths where a train step's
compiled temporaries fall as T grows, or where their bytes per token jump."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Temporaries (bytes) of the benchmark's step with the CPU row schedule taken up to 16
# query blocks of 512 rows, and with it capped by its keys per query row.
ROWS_UP_TO_16_BLOCKS = {
  1024: 68576840,
  2048: 181843528,
  4096: 527423048,
  8192: 1627493960,
  16384: 512170952,
  32768: 1022041160,
}
ROWS_CAPPED = {
  1024: 68576840,
  2048: 74759496,
  4096: 133291336,
  8192: 257235912,
  16384: 512170952,
  32768: 1022041160,
}


def _benchmark():
  spec = importlib.util.spec_from_file_location(
    "attention_memory", os.path.join(ROOT, "benchmarks", "attention_memory.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_jumps_name_falls_and_per_token_growth():
  bench = _benchmark()
  found = bench.jumps(ROWS_UP_TO_16_BLOCKS)
  assert [line.split(":")[0] for line in found] == [
    "T=1024 -> 2048",  # 66970 -> 88791 bytes per token: 1.33x
    "T=2048 -> 4096",  # 1.45x
    "T=4096 -> 8192",  # 1.54x
    "T=8192 -> 16384",  # falls
  ]
  assert "fall" in found[-1] and "1.33x" in found[0]
  assert bench.jumps(ROWS_CAPPED) == []
  # Linear memory with a fixed part: bytes per token fall, nothing to report; a rise of
  # exactly the factor is allowed, one above it is not.
  assert bench.jumps({t: 1000 * t + 10**6 for t in (1024, 2048, 4096)}) == []
  assert bench.jumps({1000: 1000, 2000: 2500}, factor=1.25) == []
  assert len(bench.jumps({1000: 1000, 2000: 2502}, factor=1.25)) == 1
