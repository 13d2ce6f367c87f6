"""Sample from a checkpoint (orbax, Hugging Face or Meta) with a KV cache.

python -m cwm_jax.sample --checkpoint DIR --prompt 'def add(a, b):' --max_new_tokens 32
python -m cwm_jax.sample --checkpoint DIR --prompt_ids 5,17,9 --json
"""

from __future__ import annotations

import json
import math
import sys

from absl import flags

from cwm_jax.base import ConfigError
from cwm_jax.cli import run_main
from cwm_jax.infer.loading import load_for_inference
from cwm_jax.infer.sampler import generate

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (orbax workdir, HF or Meta).")
flags.DEFINE_integer("step", None, "Orbax checkpoint step (default: latest).")
flags.DEFINE_string("prompt", None, "Prompt text (encoded with a leading BOS).")
flags.DEFINE_string("prompt_ids", None, "Comma-separated prompt token ids instead of --prompt.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string(
  "stop_ids",
  None,
  "Comma-separated stop ids (default: the tokenizer's "
  "stop tokens with --prompt, none with --prompt_ids).",
)
flags.DEFINE_string(
  "tokenizer", None, "Rank file (default: the checkpoint's, else the project BPE)."
)
flags.DEFINE_bool("json", False, "Print a JSON object with the ids and log-probs.")


def parse_ids(text: str, what: str) -> list[int]:
  try:
    return [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def check_flags() -> None:
  """Sampling flags are finite and in range (ConfigError naming the flag otherwise)."""
  if not (math.isfinite(FLAGS.temperature) and FLAGS.temperature >= 0):
    raise ConfigError(
      f"--temperature={FLAGS.temperature} must be a finite number >= 0 (0 is greedy)"
    )
  if not (math.isfinite(FLAGS.top_p) and 0 < FLAGS.top_p <= 1):
    raise ConfigError(f"--top_p={FLAGS.top_p} must be in (0, 1] (1 keeps every token)")
  if FLAGS.max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens={FLAGS.max_new_tokens} must be >= 1")
  if FLAGS.step is not None and FLAGS.step < 0:
    raise ConfigError(f"--step={FLAGS.step} must be >= 0 (omit it for the latest step)")


def run_sample() -> dict:
  check_flags()
  if (FLAGS.prompt is None) == (FLAGS.prompt_ids is None):
    raise ConfigError("give exactly one of --prompt TEXT or --prompt_ids 5,17,9")
  if not FLAGS.checkpoint:
    raise ConfigError("--checkpoint DIR is required")
  use_text = FLAGS.prompt is not None
  model, tok = load_for_inference(FLAGS.checkpoint, FLAGS.step, FLAGS.tokenizer, use_text)
  prompt = (
    tok.encode(FLAGS.prompt, bos=True) if use_text else parse_ids(FLAGS.prompt_ids, "--prompt_ids")
  )
  stop = (
    parse_ids(FLAGS.stop_ids, "--stop_ids")
    if FLAGS.stop_ids is not None
    else list(tok.stop_ids)
    if use_text
    else []
  )
  vocab = model.cfg.vocab_size
  for what, ids in (("--prompt_ids", prompt), ("--stop_ids", stop)):
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
      raise ConfigError(f"{what} {bad[:5]} outside the checkpoint's vocabulary [0, {vocab})")
  if not prompt:
    raise ConfigError("the prompt is empty; pass --prompt TEXT or --prompt_ids 5,17,9")
  try:
    result = generate(
      model,
      [prompt],
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature,
      top_p=FLAGS.top_p,
      stop_ids=stop,
      seed=FLAGS.seed,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None
  out = {"prompt_ids": prompt, "tokens": result.tokens[0], "logprobs": result.logprobs[0]}
  if tok is not None:
    out["text"] = tok.decode(result.tokens[0])
  return out


def main(argv):
  if len(argv) > 1:
    print(f"sample: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  out = run_sample()
  if FLAGS.json:
    print(json.dumps(out))
  else:
    print(FLAGS.prompt + out["text"] if "text" in out else " ".join(map(str, out["tokens"])))


def run():
  run_main(main)


if __name__ == "__main__":
  run()
