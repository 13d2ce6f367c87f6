"""Per-token log-probabilities of a token sequence under a checkpoint.

  python -m cwm_jax.score --checkpoint DIR --token_ids 5,17,9 --output lp.npy

The checkpoint and the output may be local paths or URLs (`gs://...`).
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint.load import load_model
from cwm_jax.cli import run_main
from cwm_jax.model.logprobs import token_logprobs

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Hugging Face, Meta or orbax checkpoint directory.")
flags.DEFINE_string("token_ids", None, "Comma-separated token ids (at least 2).")
flags.DEFINE_string(
  "output",
  None,
  "Where to write the float32 .npy of length T-1 (local "
  "or gs://; '.npy' is appended when missing).",
)
flags.DEFINE_integer("step", None, "Orbax checkpoint step (default: latest).")


def score_tokens(model, tokens_T) -> np.ndarray:
  """log p(tokens[t] | tokens[:t]) for t >= 1, float32 [T-1]."""
  tokens_1T = jnp.asarray(tokens_T, jnp.int32)[None]
  logits_1TV = jax.jit(lambda t: model(t))(tokens_1T)
  return np.asarray(token_logprobs(logits_1TV[:, :-1], tokens_1T[:, 1:])[0], np.float32)


def parse_ids(text: str, vocab_size: int) -> list[int]:
  try:
    ids = [int(t) for t in text.split(",") if t.strip()]
  except ValueError as e:
    raise ConfigError(f"--token_ids must be comma-separated integers: {e}") from None
  if len(ids) < 2:
    raise ConfigError("--token_ids needs at least 2 tokens to score")
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ConfigError(f"--token_ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
  return ids


def output_path(output: str) -> str:
  """The file `--output` names ('.npy' appended when missing, as numpy.save does); a
  local one must lie in an existing directory (checked before the model loads)."""
  path = output if output.endswith(".npy") else output + ".npy"
  bad = storage.isdir(output) or storage.isdir(path)
  if not storage.is_url(path):  # an object store needs no parent folder
    bad = bad or not storage.isdir(storage.dirname(path))
  if bad:
    raise ConfigError(
      f"--output {output!r} must be a file path in an existing directory (or a gs:// object path)"
    )
  return path


def save_npy(path: str, array: np.ndarray) -> None:
  """`array` as a .npy file at `path` (local or URL), written whole."""
  buf = io.BytesIO()
  np.save(buf, array)
  storage.write_bytes(path, buf.getvalue())


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}; pass settings as --flags")
  if not (FLAGS.checkpoint and FLAGS.token_ids and FLAGS.output):
    raise ConfigError("--checkpoint, --token_ids and --output are required")
  output = output_path(FLAGS.output)
  if FLAGS.step is not None and FLAGS.step < 0:
    raise ConfigError(f"--step={FLAGS.step} must be >= 0 (omit it for the latest step)")
  cfg, model = load_model(FLAGS.checkpoint, FLAGS.step)
  ids = parse_ids(FLAGS.token_ids, cfg.vocab_size)
  lp = score_tokens(model, ids)
  save_npy(output, lp)
  print(f"wrote {lp.shape[0]} log-probs to {output} (sum {lp.sum():.4f})")


def run():
  run_main(main)


if __name__ == "__main__":
  run()
