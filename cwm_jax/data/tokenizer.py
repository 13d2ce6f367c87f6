"""CWM tokenizer: tiktoken BPE with the Llama-3 split regex and CWM specials.

A rank file (the release's `tokenizer.model`, or the project's small BPE)
holds `n_ranks` byte sequences. The 256 special tokens follow the ranks:
special id = n_ranks + offset, with the offsets of the CWM technical report (the
release file has 128000 ranks, so `<|eot_id|>` is 128009 there). Unnamed
offsets are `<|reserved_special_token_OFFSET|>`.

Plain text never yields a special token: `encode` treats `<|eot_id|>` in the
text as ordinary characters. Specials enter documents only through the
structured helpers (`encode_message`, `trace_prompt`, `encode_trace`).
"""

import base64
import functools
import os

import tiktoken

from cwm_jax import storage
from cwm_jax.base import ConfigError

PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIALS = 256
NAMED_SPECIALS = {
  0: "<|begin_of_text|>",
  1: "<|end_of_text|>",
  4: "<|pad|>",
  6: "<|start_header_id|>",
  7: "<|end_header_id|>",
  8: "<|eom_id|>",
  9: "<|eot_id|>",
  100: "<|frame_sep|>",
  101: "<|action_sep|>",
  102: "<|return_sep|>",
  103: "<|call_sep|>",
  104: "<|line_sep|>",
  105: "<|exception_sep|>",
  106: "<|arg_sep|>",
  107: "<|trace_context_start|>",
  120: "<|reasoning_thinking_start|>",
  121: "<|reasoning_thinking_end|>",
}
SPECIAL_NAMES = tuple(
  NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i}|>") for i in range(NUM_SPECIALS)
)
# Specials that may appear inside a CWM trace document's text.
TRACE_SPECIALS = frozenset(NAMED_SPECIALS[i] for i in (0, 1, *range(100, 108)))
DEFAULT_RANK_FILE = os.path.join(os.path.dirname(__file__), "assets", "cwm_bpe_4096.tiktoken")
_FIXED_ROLES = ("system", "user", "assistant")


def read_rank_file(path: str) -> dict[bytes, int]:
  """Parses a tiktoken rank file (`base64 rank` per line; `path` local or a URL)."""
  if not storage.isfile(path):
    raise FileNotFoundError(
      f"rank file {path!r} not found: pass the release tokenizer.model or "
      "train one with `python -m cwm_jax.data.bpe --out PATH`"
    )
  ranks = {}
  for lineno, line in enumerate(storage.read_bytes(path).split(b"\n"), 1):
    if not line.strip():
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
      raise ConfigError(
        f"rank file {path}:{lineno} is not a `base64 rank` line: not a "
        "tiktoken rank file; pass the release tokenizer.model"
      ) from None
  if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
    raise ConfigError(
      f"rank file {path}: ranks must be 0..N-1, each once (found "
      f"{len(ranks)} lines); pass the release tokenizer.model"
    )
  return ranks


def check_role(role: str) -> str:
  """Returns `role` if it is system, user, assistant or `tool: NAME`."""
  if role in _FIXED_ROLES or (role.startswith("tool: ") and role[6:].strip()):
    return role
  raise ValueError(f"bad chat role {role!r}: use system, user, assistant or 'tool: NAME'")


class Tokenizer:
  """Byte-level BPE over `ranks` followed by the 256 CWM special tokens."""

  def __init__(self, ranks: dict[bytes, int], name: str = "cwm"):
    self.n_ranks = len(ranks)
    self._ranks = dict(ranks)
    self._specials = {s: self.n_ranks + i for i, s in enumerate(SPECIAL_NAMES)}
    self._enc = tiktoken.Encoding(
      name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self._specials
    )

  @classmethod
  def from_rank_file(cls, path: str) -> "Tokenizer":
    ranks = read_rank_file(path)
    try:
      return cls(ranks, name=storage.basename(path))
    except ValueError as e:
      raise ConfigError(
        f"rank file {path} does not make a BPE tokenizer ({e}); pass the release tokenizer.model"
      ) from None

  @classmethod
  def default(cls) -> "Tokenizer":
    """The project's 4096-rank BPE shipped in `cwm_jax/data/assets/`."""
    return _default()

  @property
  def mergeable_ranks(self) -> dict[bytes, int]:
    """A copy of the rank table {token bytes: rank} (what an export's tokenizer.json is
    derived from)."""
    return dict(self._ranks)

  @property
  def vocab_size(self) -> int:
    return self.n_ranks + NUM_SPECIALS

  def special_id(self, name: str) -> int:
    if name not in self._specials:
      raise KeyError(f"{name!r} is not a special token; see SPECIAL_NAMES")
    return self._specials[name]

  def is_special(self, token_id: int) -> bool:
    return self.n_ranks <= token_id < self.vocab_size

  @property
  def bos_id(self) -> int:
    return self.n_ranks

  @property
  def eos_id(self) -> int:
    return self.n_ranks + 1

  @property
  def pad_id(self) -> int:
    return self.n_ranks + 4

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """end_of_text, eom and eot: generation stops at any of them."""
    return (self.n_ranks + 1, self.n_ranks + 8, self.n_ranks + 9)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Plain text to ids; special-token strings stay ordinary text."""
    ids = self._enc.encode_ordinary(text)
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids) -> str:
    """Ids to text; bytes that are not valid UTF-8 become U+FFFD."""
    return self._enc.decode([int(i) for i in ids], errors="replace")

  def decode_bytes(self, ids) -> bytes:
    return self._enc.decode_bytes([int(i) for i in ids])

  def encode_trace(self, text: str) -> list[int]:
    """A CWM trace document (prompt + frames) whose markers are specials.

    Only the trace markers, begin_of_text and end_of_text are recognised.
    """
    return self._enc.encode(text, allowed_special=TRACE_SPECIALS, disallowed_special=())

  def trace_prompt(self, marked_source: str) -> list[int]:
    """`<|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>`."""
    return (
      [self.bos_id, self.special_id("<|trace_context_start|>")]
      + self.encode(marked_source)
      + [self.special_id("<|frame_sep|>")]
    )

  def header(self, role: str) -> list[int]:
    """`<|start_header_id|>ROLE<|end_header_id|>\\n\\n`."""
    return (
      [self.special_id("<|start_header_id|>")]
      + self.encode(check_role(role))
      + [self.special_id("<|end_header_id|>")]
      + self.encode("\n\n")
    )

  def encode_message(self, role: str, body: str, end: str = "<|eot_id|>") -> list[int]:
    """One chat message: header, body (plain text), end token."""
    return self.header(role) + self.encode(body) + [self.special_id(end)]

  def encode_dialog(self, messages, generation_role: str | None = "assistant") -> list[int]:
    """`<|begin_of_text|>`, each (role, body) message, then an open header.

    `generation_role=None` leaves no open header (a complete dialog).
    """
    ids = [self.bos_id]
    for role, body in messages:
      ids += self.encode_message(role, body)
    if generation_role is not None:
      ids += self.header(generation_role)
    return ids


@functools.lru_cache(maxsize=1)
def _default() -> Tokenizer:
  return Tokenizer.from_rank_file(DEFAULT_RANK_FILE)
