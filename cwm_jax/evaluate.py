"""Trace-prediction accuracy and per-source perplexity of a checkpoint, as JSON.

  python -m cwm_jax.evaluate --checkpoint DIR [--max_programs 8] [--nogenerate]
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from cwm_jax.cli import run_main
from cwm_jax.infer.evaluation import EvalConfig, evaluate, held_out_cases, unscored
from cwm_jax.infer.loading import load_for_inference
from cwm_jax.base import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (orbax workdir, HF or Meta).")
flags.DEFINE_integer("step", None, "Orbax checkpoint step (default: latest).")
flags.DEFINE_string("tokenizer", None, "Rank file (default: the checkpoint's, else the "
                    "project BPE).")
flags.DEFINE_string("programs_dir", None, "Programs with INPUTS (default: the shipped ones).")
flags.DEFINE_integer("max_programs", EvalConfig.max_programs, "Held-out calls to evaluate.")
flags.DEFINE_integer("max_new_tokens", EvalConfig.max_new_tokens, "Tokens per predicted trace.")
flags.DEFINE_integer("max_tokens", EvalConfig.max_tokens, "Teacher-forced length cap.")
flags.DEFINE_integer("batch_size", EvalConfig.batch_size, "Sequences per forward / generate.")
flags.DEFINE_bool("generate", True, "Generate traces (exact-match metrics).")
flags.DEFINE_bool("perplexity", True, "Per-source perplexity.")


def main(argv):
  if len(argv) > 1:
    print(f"evaluate: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if not FLAGS.checkpoint:
    raise ConfigError("--checkpoint DIR is required")
  if FLAGS.programs_dir is not None and not os.path.isdir(FLAGS.programs_dir):
    raise ConfigError(f"--programs_dir {FLAGS.programs_dir!r} is not a directory; pass a folder "
                      "of programs with INPUTS (or omit it for the shipped ones)")
  if FLAGS.step is not None and FLAGS.step < 0:
    raise ConfigError(f"--step={FLAGS.step} must be >= 0 (omit it for the latest step)")
  config = EvalConfig(programs_dir=FLAGS.programs_dir, max_programs=FLAGS.max_programs,
                      max_new_tokens=FLAGS.max_new_tokens, max_tokens=FLAGS.max_tokens,
                      batch_size=FLAGS.batch_size, generate=FLAGS.generate,
                      perplexity=FLAGS.perplexity)
  # Trace the held-out programs (cached) before JAX starts its threads.
  held_out_cases(config.programs_dir, config.max_programs, config.timeout_s)
  model, tok = load_for_inference(FLAGS.checkpoint, FLAGS.step, FLAGS.tokenizer)
  metrics = evaluate(model, tok, config)
  empty = unscored(metrics)
  out = {k: (None if k in empty else v) for k, v in metrics.items()}
  if empty:
    out["unscored"] = {"metrics": empty, "why": "nothing was scored for these (no tokens, "
                       "frames or programs); raise --max_tokens or --max_programs"}
  print(json.dumps(out, indent=1, sort_keys=True))


def run():
  run_main(main)


if __name__ == "__main__":
  run()
