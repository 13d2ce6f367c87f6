"""Packed tokens/s per worker and padding fraction of the grain pipeline.

  python benchmarks/data_pipeline.py [--code_files 120] [--trace_calls 60] [--save]

Builds the code and traces corpora (subsets) in a temporary folder, then for
each corpus and sequence length (8192, 131072) runs the pipeline in-process
(one worker, first-fit packing, repeat forever) and prints one JSON object:
non-padding tokens per second and the padding fraction of the emitted rows. `--save` also
writes it under benchmarks/results/data_pipeline/ (`results_io`).
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax.data import corpus_build, pipeline

_CODE_FILES = flags.DEFINE_integer("code_files", 120, "stdlib files to use.")
_TRACE_CALLS = flags.DEFINE_integer("trace_calls", 60, "calls to trace.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "time per measurement.")
_ROWS = flags.DEFINE_integer("rows", 2, "rows per batch.")
_SAVE = flags.DEFINE_bool("save", False, "also write it under benchmarks/results/.")


def measure(folder: str, seq_len: int, rows: int, seconds: float) -> dict:
  cfg = pipeline.default_data_config().to_dict()
  cfg["mixture"] = [{"kind": "array_record", "path": folder}]
  it = pipeline.make_iterator(cfg, seq_len=seq_len, global_batch=rows)
  next(it)  # warm-up: opens files, loads the tokenizer
  tokens = slots = batches = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds or batches < 2:
    batch = next(it)
    real = int((batch["segment_ids"] > 0).sum())
    tokens, slots, batches = tokens + real, slots + batch["inputs"].size, batches + 1
  elapsed = time.perf_counter() - start
  return {
    "tokens_per_s_per_worker": round(tokens / elapsed),
    "padding_fraction": round(1 - tokens / slots, 4),
    "batches": batches,
    "bad_records": it.bad_record_counts(),
  }


def main(argv):
  del argv
  out = {
    "device": "cpu (one in-process worker)",
    "packing": "first_fit",
    "rows_per_batch": _ROWS.value,
    "results": {},
  }
  with tempfile.TemporaryDirectory() as tmp:
    limits = {"code": _CODE_FILES.value, "traces": _TRACE_CALLS.value}
    for corpus, limit in limits.items():
      folder = os.path.join(tmp, corpus)
      records = corpus_build.build_corpus(corpus, folder, limit=limit)["records"]
      for seq_len in (8192, 131072):
        result = measure(folder, seq_len, _ROWS.value, _SECONDS.value)
        out["results"][f"{corpus}@{seq_len}"] = {"records": records, **result}
  print(json.dumps(out))
  if _SAVE.value:
    print("saved", results_io.save("data_pipeline", out), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
