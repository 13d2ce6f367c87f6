"""The project's tokenizer as transformers reads it: tokenizer.json, tokenizer_config.json and
generation_config.json for a Hugging Face export.

`Tokenizer` (cwm_jax.data.tokenizer) is tiktoken: a rank table over byte strings, the Llama-3
split regex, then byte-pair merges in rank order, followed by the 256 CWM specials. The
`tokenizers` library expresses the same thing as a BPE model over byte-level characters
(GPT-2's byte -> printable character table) with

- the same split regex (a `Split` pre-tokenizer, then `ByteLevel` without its own regex);
- `ignore_merges`: a piece that is itself a token is emitted whole, as tiktoken does before
  merging;
- a merge list ordered by the rank of the merged token. tiktoken merges the adjacent pair
  whose concatenation has the lowest rank, whichever way that token splits, so every split
  (left, right) of a token whose halves are both tokens is a merge, at the token's rank.
  tiktoken breaks a tie between equal-rank pairs by position (leftmost first), which
  `tokenizers` does for one merge; two different splits of one token are separate merges
  there, so `tokenizers` could order them differently only where both are adjacent pairs of
  the same piece at once and overlap (a token T = x + y = y + z, parts x, y, z side by side).
  `ambiguous_merges` lists the tokens where that is possible; tests/test_export.py checks
  encodings on the project's corpora.

Specials are added tokens (never split, `special: true`), so `tokenizer(text)` reads a special
token's string in text as that special, like `Tokenizer.encode_trace` does for trace markers
(plain `Tokenizer.encode` keeps such strings as text). A `TemplateProcessing` post-processor
puts `<|begin_of_text|>` first, as `encode(text, bos=True)`; the chat template writes the
dialog format of `Tokenizer.encode_dialog` (and `formats.chat_example`'s reasoning form).
"""

from __future__ import annotations

import functools
from typing import Any

from cwm_jax import storage
from cwm_jax.data import tokenizer as tokenizer_lib
from cwm_jax.data.tokenizer import Tokenizer

# The dialog format of `Tokenizer.encode_dialog` / `formats.chat_example`: BOS, then per
# message `<|start_header_id|>ROLE<|end_header_id|>\n\n[THINKING]BODY<|eot_id|>`, then an open
# assistant header when a generation prompt is asked for.
CHAT_TEMPLATE = (
  "{{- bos_token }}"
  "{%- for message in messages %}"
  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
  "{%- if message.get('reasoning') is not none %}"
  "{{- '<|reasoning_thinking_start|>' + message['reasoning'] + '<|reasoning_thinking_end|>' }}"
  "{%- endif %}"
  "{{- message['content'] + '<|eot_id|>' }}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}"
  "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
  "{%- endif %}"
)
FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
  """GPT-2's byte -> character table (`bytes_to_unicode`), which the ByteLevel pre-tokenizer
  and decoder use: printable bytes map to themselves, the others to U+0100 onwards."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return tuple(table[b] for b in range(256))


def token_string(token: bytes) -> str:
  """A rank's byte string as the BPE model's vocabulary entry."""
  chars = _byte_chars()
  return "".join(chars[b] for b in token)


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """Every split (left, right) of every multi-byte token into two tokens, ordered by the
  merged token's rank (then by the left part's length, i.e. a fixed order)."""
  out = []
  for token, rank in ranks.items():
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in ranks and right in ranks:
        out.append((rank, cut, left, right))
  out.sort()
  return [(left, right) for _, _, left, right in out]


def ambiguous_merges(ranks: dict[bytes, int]) -> list[bytes]:
  """Tokens T = x + y = y + z (x != z, all three tokens): the only place where the merge
  order of `tokenizers` and tiktoken's leftmost-first choice could differ (see the module
  docstring)."""
  found = []
  for token in ranks:
    n = len(token)
    for k in range(1, n):  # |x| = |z| = k, y = the border of length n - k
      x, y, z = token[:k], token[k:], token[n - k :]
      if x != z and token[: n - k] == y and x in ranks and y in ranks and z in ranks:
        found.append(token)
        break
  return found


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
  """The `tokenizers` serialisation of `tok` (what `Tokenizer.from_str` / transformers load)."""
  ranks = tok.mergeable_ranks
  bos = tokenizer_lib.SPECIAL_NAMES[0]
  return {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [
      {
        "id": tok.n_ranks + i,
        "content": name,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
      }
      for i, name in enumerate(tokenizer_lib.SPECIAL_NAMES)
    ],
    "normalizer": None,
    "pre_tokenizer": {
      "type": "Sequence",
      "pretokenizers": [
        {
          "type": "Split",
          "pattern": {"Regex": tokenizer_lib.PATTERN},
          "behavior": "Isolated",
          "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
      ],
    },
    "post_processor": {
      "type": "TemplateProcessing",
      "single": [
        {"SpecialToken": {"id": bos, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
      ],
      "pair": [
        {"SpecialToken": {"id": bos, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": bos, "type_id": 1}},
        {"Sequence": {"id": "B", "type_id": 1}},
      ],
      "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
    },
    "decoder": {
      "type": "ByteLevel",
      "add_prefix_space": True,
      "trim_offsets": True,
      "use_regex": True,
    },
    "model": {
      "type": "BPE",
      "dropout": None,
      "unk_token": None,
      "continuing_subword_prefix": None,
      "end_of_word_suffix": None,
      "fuse_unk": False,
      "byte_fallback": False,
      "ignore_merges": True,
      "vocab": {token_string(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
      "merges": [[token_string(a), token_string(b)] for a, b in merges(ranks)],
    },
  }


def tokenizer_config(tok: Tokenizer, max_length: int) -> dict[str, Any]:
  """tokenizer_config.json: the fast tokenizer class, CWM's special tokens, the chat template.

  `clean_up_tokenization_spaces` is off: decoding must give back the exact text (it would
  otherwise drop spaces before punctuation in code)."""
  names = tokenizer_lib.SPECIAL_NAMES
  return {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": names[0],
    "eos_token": names[9],
    "pad_token": names[4],
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": int(max_length),
    "model_input_names": ["input_ids", "attention_mask"],
    "added_tokens_decoder": {
      str(tok.n_ranks + i): {
        "content": name,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
      }
      for i, name in enumerate(names)
    },
    "chat_template": CHAT_TEMPLATE,
  }


def generation_config(token_ids: dict[str, Any]) -> dict[str, Any]:
  """generation_config.json: bos, the stop ids as eos (generation ends at any of them), pad;
  greedy unless the caller asks to sample, as the project's sampler defaults."""
  return {
    **{k: token_ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in token_ids},
    "do_sample": False,
  }


def write(
  directory: str,
  tok: Tokenizer | None,
  token_ids: dict[str, Any],
  max_length: int,
  present: frozenset = frozenset(),
) -> list[str]:
  """Writes the files of FILES not in `present` (names the source already supplied) into
  `directory` (local or a URL); the tokenizer files only with a tokenizer. Returns the names
  written."""
  written = []
  if tok is not None and "tokenizer.json" not in present:
    storage.write_json(
      storage.join(directory, "tokenizer.json"), tokenizer_json(tok), ensure_ascii=False
    )
    written.append("tokenizer.json")
    if "tokenizer_config.json" not in present:
      storage.write_json(
        storage.join(directory, "tokenizer_config.json"),
        tokenizer_config(tok, max_length),
        indent=2,
        ensure_ascii=False,
      )
      written.append("tokenizer_config.json")
  if "generation_config.json" not in present and token_ids:
    storage.write_json(
      storage.join(directory, "generation_config.json"), generation_config(token_ids), indent=2
    )
    written.append("generation_config.json")
  return written
