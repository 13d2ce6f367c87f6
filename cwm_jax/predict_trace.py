"""Let a checkpoint predict a function's execution trace; compare with the interpreter.

python -m cwm_jax.predict_trace --checkpoint DIR prog.py:f --args '(3, [1, 2])'
"""

from __future__ import annotations

import json

from absl import flags

from cwm_jax.base import ConfigError
from cwm_jax.cli import run_main
from cwm_jax.data.traces.driver import parse_literal, read_program
from cwm_jax.infer.loading import load_for_inference
from cwm_jax.infer.trace_predict import TraceError, predict_frames, real_trace, side_by_side

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (orbax workdir, HF or Meta).")
flags.DEFINE_integer("step", None, "Orbax checkpoint step (default: latest).")
flags.DEFINE_string("args", "()", "Python literal tuple of positional arguments.")
flags.DEFINE_string("kwargs", "{}", "Python literal dict of keyword arguments.")
flags.DEFINE_integer("max_new_tokens", 1024, "Generation budget for the predicted trace.")
flags.DEFINE_string(
  "tokenizer", None, "Rank file (default: the checkpoint's, else the project BPE)."
)
flags.DEFINE_integer("width", 70, "Column width of the side-by-side view.")
flags.DEFINE_bool("json", False, "Print JSON (real and predicted frames, divergence).")


def parse_target(argv) -> tuple[str, str, tuple, dict]:
  if len(argv) != 2 or ":" not in argv[1]:
    raise ConfigError(
      "usage: python -m cwm_jax.predict_trace --checkpoint DIR FILE.py:FUNCTION [--args '(1, 2)']"
    )
  path, function = argv[1].rsplit(":", 1)
  try:
    source = read_program(path)
    args = parse_literal(FLAGS.args, "--args")
    kwargs = parse_literal(FLAGS.kwargs, "--kwargs")
  except ValueError as e:
    raise ConfigError(f"cannot read the program or the literals: {e}") from None
  if not isinstance(kwargs, dict):
    raise ConfigError("--kwargs must be a dict literal")
  return source, function, args if isinstance(args, tuple) else (args,), kwargs


def main(argv):
  if not FLAGS.checkpoint:
    raise ConfigError("--checkpoint DIR is required")
  for name in ("max_new_tokens", "width"):
    if FLAGS[name].value < 1:
      raise ConfigError(f"--{name}={FLAGS[name].value} must be >= 1")
  source, function, args, kwargs = parse_target(argv)
  frames = real_trace(source, function, args, kwargs)  # before JAX starts its threads
  model, tok = load_for_inference(FLAGS.checkpoint, FLAGS.step, FLAGS.tokenizer)
  pred = predict_frames(
    model, tok, [(source, function, frames)], max_new_tokens=FLAGS.max_new_tokens
  )[0]
  if FLAGS.json:
    print(
      json.dumps(
        {
          "real": pred.real,
          "predicted": pred.predicted,
          "finished": pred.finished,
          "first_divergence": pred.divergence,
          "return_match": pred.return_match,
        }
      )
    )
  else:
    print(side_by_side(pred, FLAGS.width))


def run():
  run_main(main, errors=(TraceError, ValueError))


if __name__ == "__main__":
  run()
