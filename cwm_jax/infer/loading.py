"""Model and tokenizer for inference from a checkpoint directory (local or a URL)."""

from __future__ import annotations

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint.load import load_model
from cwm_jax.data.tokenizer import Tokenizer

RANK_FILES = ("tokenizer.model", "*.tiktoken")


def find_rank_file(directory: str) -> str | None:
  """A tokenizer rank file shipped in the checkpoint directory (or its parent), if any."""
  parent = storage.dirname(directory)
  # A bucket's root has no parent (`gs:` is no folder).
  folders = [directory] + ([parent] if storage.is_url(parent) == storage.is_url(directory) else [])
  for folder in folders:
    for pattern in RANK_FILES:
      found = storage.glob(storage.join(folder, pattern))
      if found:
        return found[0]
  return None


def load_tokenizer(checkpoint: str, path: str | None = None) -> Tokenizer:
  """`path`, else the checkpoint's rank file, else the project's default BPE; a rank
  file at a URL is read from its cached local copy."""
  path = path or find_rank_file(checkpoint)
  return Tokenizer.from_rank_file(storage.local_copy(path)) if path else Tokenizer.default()


def load_for_inference(
  checkpoint: str,
  step: int | None = None,
  tokenizer_path: str | None = None,
  need_tokenizer: bool = True,
):
  """(model, tokenizer or None) for an orbax, Hugging Face or Meta checkpoint.

  An orbax training workdir is accepted as well as its `checkpoints/` folder.
  """
  cfg, model = load_model(checkpoint, step)
  if not need_tokenizer:
    return model, None
  tokenizer = load_tokenizer(checkpoint, tokenizer_path)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(
      f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's "
      f"vocabulary is {cfg.vocab_size}: pass the right --tokenizer rank file, "
      "or use --prompt_ids"
    )
  return model, tokenizer
