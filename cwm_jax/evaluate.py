"""Trace-prediction accuracy and per-source perplexity of a checkpoint, or a standard code
benchmark from a local file (docs/evaluation.md), as JSON.

  python -m cwm_jax.evaluate --checkpoint DIR [--max_programs 8] [--nogenerate]
  python -m cwm_jax.evaluate --suite humaneval|mbpp|cruxeval_o|cruxeval_i|livecodebench \
      --data FILE (--checkpoint DIR [--n 1 --temperature 0] | --samples FILE | --references) \
      [--k 1,10] [--results FILE]
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.cli import run_main
from cwm_jax.infer import benchmarks
from cwm_jax.infer.evaluation import EvalConfig, evaluate, held_out_cases, unscored
from cwm_jax.infer.loading import load_for_inference

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (orbax workdir, HF or Meta).")
flags.DEFINE_integer("step", None, "Orbax checkpoint step (default: latest).")
flags.DEFINE_string(
  "tokenizer", None, "Rank file (default: the checkpoint's, else the project BPE)."
)
flags.DEFINE_string("programs_dir", None, "Programs with INPUTS (default: the shipped ones).")
flags.DEFINE_integer("max_programs", EvalConfig.max_programs, "Held-out calls to evaluate.")
flags.DEFINE_integer("max_new_tokens", EvalConfig.max_new_tokens, "Tokens per predicted trace.")
flags.DEFINE_integer("max_tokens", EvalConfig.max_tokens, "Teacher-forced length cap.")
flags.DEFINE_integer("batch_size", EvalConfig.batch_size, "Sequences per forward / generate.")
flags.DEFINE_bool("generate", True, "Generate traces (exact-match metrics).")
flags.DEFINE_bool("perplexity", True, "Per-source perplexity.")
flags.DEFINE_string("suite", None, f"A code benchmark: one of {', '.join(benchmarks.SUITES)}.")
flags.DEFINE_string("data", None, "The suite's JSONL file in its published format.")
flags.DEFINE_string(
  "samples", None, "Score these completions (JSONL: task_id, completion) instead of generating."
)
flags.DEFINE_bool(
  "references",
  False,
  "Score each task's reference answer (checks the data file and the sandbox: all should pass).",
)
flags.DEFINE_integer("n", 1, "Completions generated per task.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of generated completions (0: greedy).")
flags.DEFINE_list("k", ["1"], "pass@k for these k.")
flags.DEFINE_string(
  "results", None, "Per-sample results JSONL (default: SUITE_results.jsonl in the current folder)."
)
flags.DEFINE_integer("workers", 2, "Sandboxed runs at a time.")


def _ks() -> list[int]:
  try:
    ks = [int(k) for k in FLAGS.k]
  except ValueError:
    ks = []
  if not ks or min(ks) < 1:
    raise ConfigError(f"--k {','.join(FLAGS.k)} must be positive integers, e.g. --k 1,10")
  return ks


def run_suite() -> dict:
  """--suite: scores samples, references or generated completions; writes the per-sample
  results and returns the summary."""
  benchmarks.check_suite(FLAGS.suite)
  if not FLAGS.data:
    raise ConfigError("--suite needs --data FILE (the suite's JSONL file)")
  sources = [bool(FLAGS.samples), FLAGS.references, bool(FLAGS.checkpoint)]
  if sum(sources) != 1:
    raise ConfigError("pass exactly one of --samples FILE, --references or --checkpoint DIR")
  if FLAGS.n < 1 or FLAGS.temperature < 0 or FLAGS.workers < 1:
    raise ConfigError("--n and --workers must be >= 1 and --temperature >= 0")
  if FLAGS.n > 1 and FLAGS.temperature == 0:
    raise ConfigError(
      f"--n {FLAGS.n} greedy completions would all be the same; set "
      "--temperature (e.g. 0.8) or --n 1"
    )
  ks = _ks()
  tasks = benchmarks.load_tasks(FLAGS.suite, FLAGS.data)
  if FLAGS.samples:
    samples = benchmarks.read_samples(FLAGS.samples, tasks)
  elif FLAGS.references:
    samples = benchmarks.references(tasks)
  else:
    model, tok = load_for_inference(FLAGS.checkpoint, FLAGS.step, FLAGS.tokenizer)
    samples = benchmarks.generate(
      model,
      tok,
      FLAGS.suite,
      tasks,
      n=FLAGS.n,
      temperature=FLAGS.temperature,
      max_new_tokens=FLAGS.max_new_tokens,
      batch_size=FLAGS.batch_size,
    )
  summary, rows = benchmarks.score(FLAGS.suite, tasks, samples, ks, workers=FLAGS.workers)
  results = FLAGS.results or f"{FLAGS.suite}_results.jsonl"
  benchmarks.write_results(results, rows)
  return {**summary, "data": FLAGS.data, "results": storage.absolute(results)}


def main(argv):
  if len(argv) > 1:
    print(f"evaluate: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.suite is not None:
    print(json.dumps(run_suite(), indent=1, sort_keys=True))
    return
  if not FLAGS.checkpoint:
    raise ConfigError("--checkpoint DIR is required")
  if FLAGS.programs_dir is not None and not os.path.isdir(FLAGS.programs_dir):
    raise ConfigError(
      f"--programs_dir {FLAGS.programs_dir!r} is not a directory; pass a folder "
      "of programs with INPUTS (or omit it for the shipped ones)"
    )
  if FLAGS.step is not None and FLAGS.step < 0:
    raise ConfigError(f"--step={FLAGS.step} must be >= 0 (omit it for the latest step)")
  config = EvalConfig(
    programs_dir=FLAGS.programs_dir,
    max_programs=FLAGS.max_programs,
    max_new_tokens=FLAGS.max_new_tokens,
    max_tokens=FLAGS.max_tokens,
    batch_size=FLAGS.batch_size,
    generate=FLAGS.generate,
    perplexity=FLAGS.perplexity,
  )
  # Trace the held-out programs (cached) before JAX starts its threads.
  held_out_cases(config.programs_dir, config.max_programs, config.timeout_s)
  model, tok = load_for_inference(FLAGS.checkpoint, FLAGS.step, FLAGS.tokenizer)
  metrics = evaluate(model, tok, config)
  empty = unscored(metrics)
  out = {k: (None if k in empty else v) for k, v in metrics.items()}
  if empty:
    out["unscored"] = {
      "metrics": empty,
      "why": "nothing was scored for these (no tokens, "
      "frames or programs); raise --max_tokens or --max_programs",
    }
  print(json.dumps(out, indent=1, sort_keys=True))


def run():
  run_main(main)


if __name__ == "__main__":
  run()
