"""Convert CWM checkpoints between orbax, Hugging Face and Meta (DCP), one tensor at a time.

  python -m cwm_jax.convert --src DIR --dst DIR --to {orbax,hf,meta} \
      [--dtype bfloat16|float32] [--step N] [--max_shard_gb 5]

Either directory may be local or a URL (gs://bucket/path). The source format is
detected from its files. Exit code 2 on bad arguments or
an invalid source (missing/extra tensors, shape/dtype mismatch, unknown format,
non-empty destination).
"""

from __future__ import annotations

import json
import math
import sys

from absl import flags

from cwm_jax.base import ConfigError
from cwm_jax.checkpoint.conversion import FORMATS, convert
from cwm_jax.cli import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Source checkpoint directory, local or gs:// (format detected).")
flags.DEFINE_string(
  "dst", None, "Destination directory, local or gs:// (must not exist or be empty)."
)
flags.DEFINE_enum("to", None, list(FORMATS), "Destination format.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Output dtype (default: the source's).")
flags.DEFINE_integer("step", None, "Orbax step to read (default latest) or to write (default 0).")
flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file written, in GB (10^9 bytes).")


def main(argv):
  if len(argv) > 1:
    print(f"convert: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if not (FLAGS.src and FLAGS.dst and FLAGS.to):
    raise ConfigError("--src, --dst and --to are required")
  if not (math.isfinite(FLAGS.max_shard_gb) and FLAGS.max_shard_gb >= 0.001):
    raise ConfigError(
      f"--max_shard_gb={FLAGS.max_shard_gb} must be a number >= 0.001 (1 MB); "
      "the Hub's usual size is 5"
    )
  if FLAGS.step is not None and FLAGS.step < 0:
    raise ConfigError(f"--step={FLAGS.step} must be >= 0 (omit it for the latest step)")
  summary = convert(
    FLAGS.src,
    FLAGS.dst,
    FLAGS.to,
    dtype=FLAGS.dtype,
    step=FLAGS.step,
    max_shard_bytes=int(FLAGS.max_shard_gb * 1e9),
  )
  print(json.dumps(summary))


def run():
  run_main(main)


if __name__ == "__main__":
  run()
