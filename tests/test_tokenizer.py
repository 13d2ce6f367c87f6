"""Tokenizer, chat/trace token layouts (CWM technical report) and the BPE trainer."""

import base64
import os
import random
import subprocess
import sys

import pytest

from cwm_jax.data import bpe
from cwm_jax.data import tokenizer as tokenizer_lib
from cwm_jax.data.tokenizer import Tokenizer

# Ids of the CWM technical report for the release's 128000-rank file.
SPEC_IDS = {
  "<|begin_of_text|>": 128000,
  "<|end_of_text|>": 128001,
  "<|pad|>": 128004,
  "<|start_header_id|>": 128006,
  "<|end_header_id|>": 128007,
  "<|eom_id|>": 128008,
  "<|eot_id|>": 128009,
  "<|frame_sep|>": 128100,
  "<|action_sep|>": 128101,
  "<|return_sep|>": 128102,
  "<|call_sep|>": 128103,
  "<|line_sep|>": 128104,
  "<|exception_sep|>": 128105,
  "<|arg_sep|>": 128106,
  "<|trace_context_start|>": 128107,
  "<|reasoning_thinking_start|>": 128120,
  "<|reasoning_thinking_end|>": 128121,
}

_ALPHABETS = [
  "abcXYZ019_",
  " \t\n\r\n\r\x0b\x0c",
  "()[]{}<>|=+-*/\\'\"`~!@#$%^&;:,.?",
  "éüßøÅçñ",
  "αβγΩ",
  "кирилица",
  "中文字符測試",
  "かなカナ",
  "한국어",
  "العربية",
  "עברית",
  "\u0301\u0308\u200d\ufeff",
  "😀🐍🚀👩‍💻🇺🇳",
  "\U00010348\U0001d11e",
  "\x00\x01\x7f\x80\x9f",
  "'s 're 've 'll 'd 'm 'T",
]


def _random_text(rng: random.Random) -> str:
  pieces = []
  for _ in range(rng.randint(0, 12)):
    if rng.random() < 0.1:
      pieces.append(rng.choice(tokenizer_lib.SPECIAL_NAMES))
    elif rng.random() < 0.2:
      pieces.append(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
    else:
      alphabet = rng.choice(_ALPHABETS)
      pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
  return "".join(pieces)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.default()


@pytest.fixture(scope="module")
def release_tok(tmp_path_factory):
  """A stand-in for the release's tokenizer.model: 128000 distinct ranks."""
  tokens = [bytes([i]) for i in range(256)]
  tokens += [bytes([a, b]) for a in range(256) for b in range(256)]
  tokens += [bytes([a, b, c]) for a in range(97, 123) for b in range(256) for c in range(256)]
  path = tmp_path_factory.mktemp("release") / "tokenizer.model"
  path.write_text(
    "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens[:128000]))
  )
  return Tokenizer.from_rank_file(str(path))


def test_release_rank_file_gives_spec_ids(release_tok):
  assert release_tok.n_ranks == 128000 and release_tok.vocab_size == 128256
  for name, token_id in SPEC_IDS.items():
    assert release_tok.special_id(name) == token_id
  assert release_tok.stop_ids == (128001, 128008, 128009)
  assert release_tok.special_id("<|reserved_special_token_2|>") == 128002
  assert release_tok.special_id("<|reserved_special_token_255|>") == 128255


def test_default_tokenizer_places_specials_after_ranks(tok):
  assert tok.n_ranks == 4096 and tok.vocab_size == 4096 + 256
  for name, token_id in SPEC_IDS.items():
    assert tok.special_id(name) == token_id - 128000 + 4096
    assert tok.decode([tok.special_id(name)]) == name
  assert tok.stop_ids == (4097, 4104, 4105)


def test_round_trip_random_unicode(tok):
  rng = random.Random(1234)
  for _ in range(400):
    text = _random_text(rng)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.n_ranks for i in ids), text


def test_byte_level_tokens_split_inside_characters(tok):
  text = "𝄞\U0001f9ec鬱"  # rare characters: no whole-character token
  ids = tok.encode(text)
  pieces = [tok.decode_bytes([i]) for i in ids]
  assert b"".join(pieces) == text.encode("utf-8")
  assert any(_not_utf8(p) for p in pieces)
  assert tok.decode(ids) == text


def _not_utf8(data: bytes) -> bool:
  try:
    data.decode("utf-8")
    return False
  except UnicodeDecodeError:
    return True


def test_specials_never_come_from_plain_text(tok, release_tok):
  for t in (tok, release_tok):
    for name in tokenizer_lib.SPECIAL_NAMES:
      text = f"a{name}b {name}"
      ids = t.encode(text)
      assert not any(t.is_special(i) for i in ids)
      assert t.decode(ids) == text


def test_bos_eos_and_bad_rank_file(tok, tmp_path):
  assert tok.encode("hi", bos=True, eos=True) == [4096, *tok.encode("hi"), 4097]
  bad = tmp_path / "bad.model"
  bad.write_text("YQ== 0\nYg== 5\n")
  with pytest.raises(ValueError, match="ranks must be"):
    Tokenizer.from_rank_file(str(bad))
  with pytest.raises(FileNotFoundError, match="cwm_jax.data.bpe"):
    Tokenizer.from_rank_file(str(tmp_path / "missing"))


def test_chat_layout_matches_spec(tok):
  ids = tok.encode_dialog(
    [
      ("system", "Be brief."),
      ("user", "Hi <|eot_id|>"),
      ("assistant", "Hello."),
      ("tool: python", "42"),
    ]
  )
  sh, eh, eot = (
    tok.special_id(n) for n in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
  )
  expected = [tok.bos_id]
  for role, body in [
    ("system", "Be brief."),
    ("user", "Hi <|eot_id|>"),
    ("assistant", "Hello."),
    ("tool: python", "42"),
  ]:
    expected += [sh] + tok.encode(role) + [eh] + tok.encode("\n\n") + tok.encode(body) + [eot]
  expected += [sh] + tok.encode("assistant") + [eh] + tok.encode("\n\n")
  assert ids == expected
  assert tok.decode(ids) == (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "Hi <|eot_id|><|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    "\n\nHello.<|eot_id|><|start_header_id|>tool: python<|end_header_id|>"
    "\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
  )
  assert sum(i == eot for i in ids) == 4  # the user's '<|eot_id|>' is text
  with pytest.raises(ValueError, match="bad chat role"):
    tok.header("robot")


def test_trace_prompt_and_frames_layout(tok):
  from cwm_jax.data import traces  # pylint: disable=g-import-not-at-top

  source = "def f(x):\n    y = x + 1\n    return y\n"
  marked = "def f(x):  # << START_OF_TRACE\n    y = x + 1\n    return y\n"
  prompt = traces.format_prompt(source, "f")
  sid = tok.special_id
  expected = (
    [tok.bos_id, sid("<|trace_context_start|>")] + tok.encode(marked) + [sid("<|frame_sep|>")]
  )
  assert tok.trace_prompt(marked) == expected
  assert tok.encode_trace(prompt) == expected
  frame = (
    '<|line_sep|>{"x": "1"}<|action_sep|>    y = x + 1<|frame_sep|>'
    '<|return_sep|><|action_sep|>    return y<|arg_sep|>"2"<|frame_sep|>'
    "<|end_of_text|>"
  )
  assert tok.encode_trace(frame) == (
    [sid("<|line_sep|>")]
    + tok.encode('{"x": "1"}')
    + [sid("<|action_sep|>")]
    + tok.encode("    y = x + 1")
    + [sid("<|frame_sep|>"), sid("<|return_sep|>"), sid("<|action_sep|>")]
    + tok.encode("    return y")
    + [sid("<|arg_sep|>")]
    + tok.encode('"2"')
    + [sid("<|frame_sep|>"), tok.eos_id]
  )
  # Chat markers are not trace markers: they stay text inside a trace.
  assert not any(tok.is_special(i) for i in tok.encode_trace("<|eot_id|>"))


def test_bpe_merges_hand_derived():
  # Pre-tokens 'aaaa', ' ab', ' ab'. Pair counts: (a,a)=3, ( ,a)=2, (a,b)=2:
  # 'aa' is rank 256. Then ( ,a) and (a,b) tie at 2; the smaller id pair
  # (32, 97) wins: ' a' is 257. Then (' a', b)=2 beats ('aa','aa')=1: ' ab'.
  ranks = bpe.train_bpe(["aaaa ab ab"], 259)
  merged = {t: r for t, r in ranks.items() if r >= 256}
  assert merged == {b"aa": 256, b" a": 257, b" ab": 258}
  assert ranks[b"a"] == 97 and len(ranks) == 259


def test_shipped_rank_file_invariants():
  ranks = tokenizer_lib.read_rank_file(tokenizer_lib.DEFAULT_RANK_FILE)
  assert len(ranks) == 4096
  assert all(ranks[bytes([b])] == b for b in range(256))
  by_rank = sorted(ranks, key=ranks.get)
  for r in range(256, 4096):  # each token merges two lower-ranked tokens
    t = by_rank[r]
    assert any(ranks.get(t[:k], r) < r and ranks.get(t[k:], r) < r for k in range(1, len(t))), t


def test_bpe_cli_reproduces_library_training(tmp_path):
  out = tmp_path / "small.tiktoken"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(
    [sys.executable, "-m", "cwm_jax.data.bpe", f"--out={out}", "--vocab=320", "--max_bytes=60000"],
    check=True,
    env=env,
    capture_output=True,
  )
  expected = bpe.train_bpe(bpe.stdlib_texts(60000), 320)
  assert tokenizer_lib.read_rank_file(str(out)) == expected
  assert bpe.train_bpe(bpe.stdlib_texts(60000), 320) == expected  # determinism
  bad = subprocess.run(
    [sys.executable, "-m", "cwm_jax.data.bpe", f"--out={out}", "--vocab=10"],
    env=env,
    capture_output=True,
  )
  assert bad.returncode == 2
