"""Hugging Face exports people can use as they are: the tokenizer transformers loads encodes
and decodes like the project's tiktoken tokenizer, and transformers' greedy `generate` with
the export's own generation config equals the project's sampler token for token.

References: `tokenizers` / transformers (AutoTokenizer, AutoModelForCausalLM.generate) against
tiktoken (the project's `Tokenizer`) and `cwm_jax.infer.sampler`.
"""

import json
import os
import random

import numpy as np
import pytest
import torch
import transformers

from cwm_jax.checkpoint import hf_tokenizer, manager
from cwm_jax.checkpoint.hf import config_to_hf
from cwm_jax.checkpoint.load import load_params
from cwm_jax.data import bpe, formats
from cwm_jax.data.tokenizer import SPECIAL_NAMES, Tokenizer
from cwm_jax.data.traces import format as trace_format
from cwm_jax.infer import loading, sampler, trace_predict
from cwm_jax.model import tiny
from cwm_jax.model.transformer import model_from_params
from cwm_jax.recipe.finish import export_hf

TOK = Tokenizer.default()
NEW = 24
_PROGRAMS = (
  ("def f(n):\n  total = 0\n  for i in range(n):\n    total += i\n  return total\n", "f", (4,)),
  (
    "def g(s):\n  out = {}\n  for c in s:\n    out[c] = out.get(c, 0) + 1\n  return out\n",
    "g",
    ("héllo wörld 🙂",),
  ),
  (
    "def h(x):\n  if x < 0:\n    raise ValueError(f'negative: {x!r}')\n  return x ** 0.5\n",
    "h",
    (-2.5,),
  ),
)
_DIALOGS = (
  [
    {"role": "system", "content": "You are a helpful assistant."},
    {
      "role": "user",
      "content": "What does `f(3)` return?\n\n```python\ndef f(n):\n  return n * 2\n```",
    },
  ],
  [
    {"role": "user", "content": "Write a function that reverses a string."},
    {
      "role": "assistant",
      "content": "def rev(s):\n  return s[::-1]",
      "reasoning": "Slicing with step -1 reverses.",
    },
    {"role": "user", "content": "Now in place, for a list: résumé, 1,234 items."},
  ],
)


def _stdlib_sample(every: int = 12) -> list[str]:
  return [text for i, (_, text) in enumerate(bpe.stdlib_sources()) if i % every == 0]


def _traces() -> list[str]:
  return [
    trace_format.format_trace(src, fn, trace_predict.real_trace(src, fn, args))
    for src, fn, args in _PROGRAMS
  ]


def test_tokenizer_json_encodes_like_tiktoken():
  """The `tokenizers` model alone (no transformers): identical ids on stdlib sources, on
  strings built from the tokens whose merge order could differ, and on edge-case text."""
  tokenizers = pytest.importorskip("tokenizers")
  fast = tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer.tokenizer_json(TOK)))
  texts = _stdlib_sample(every=3)
  texts += [
    "",
    " ",
    "\n\n\n",
    "  \n \t\n",
    "x  = 1\r\n\r\n",
    "1234567 89",
    "I'm we'LL you'd",
    "emoji 🙂🙂 and CJK 漢字 and \x00\x7f",
    " " * 37 + "x",
  ]
  ranks = TOK.mergeable_ranks
  parts = sorted(
    {p for t in hf_tokenizer.ambiguous_merges(ranks) for p in (t, t[:1], t[1:], t[:-1], t[-1:])}
  )
  rng = random.Random(0)
  texts += [
    b"".join(rng.choice(parts) for _ in range(rng.randint(2, 6))).decode("latin-1")
    for _ in range(3000)
  ]
  for text in texts:
    assert fast.encode(text, add_special_tokens=False).ids == TOK.encode(text), text[:80]
  # A special's string in text is that special (as `encode_trace` reads trace markers).
  assert fast.encode("<|eot_id|> plain", add_special_tokens=False).ids == [
    TOK.special_id("<|eot_id|>")
  ] + TOK.encode(" plain")
  ids = TOK.encode(texts[0]) + [TOK.special_id("<|frame_sep|>")] + TOK.encode("done")
  assert fast.decode(ids, skip_special_tokens=False) == TOK.decode(ids)


def test_merges_cover_every_split_in_rank_order():
  ranks = TOK.mergeable_ranks
  merged = [ranks[a + b] for a, b in hf_tokenizer.merges(ranks)]
  assert merged == sorted(merged)
  assert {a + b for a, b in hf_tokenizer.merges(ranks)} == {t for t in ranks if len(t) > 1}
  table = hf_tokenizer._byte_chars()  # pylint: disable=protected-access
  assert len(set(table)) == 256 and table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def _random_params(cfg, tmp):
  """Random float32 params in our layout, from a transformers CwmForCausalLM (a wider init
  than the default keeps greedy choices away from ties)."""
  torch.manual_seed(0)
  model = transformers.CwmForCausalLM(transformers.CwmConfig(**config_to_hf(cfg, "float32")))
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0, 0.2)
  model.save_pretrained(tmp)
  return load_params(tmp)[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A training-style orbax checkpoint of a tiny model with the project's vocabulary, exported
  by the smoke schedule's finish step (`finish.export_hf`). The lm_head columns of one token
  the greedy continuation emits and of `<|eot_id|>` are swapped, so that generation meets a
  stop id partway and both sides must honour it."""
  cfg = tiny(
    n_layers=3,
    local_window=6,
    global_window=128,
    vocab_size=TOK.vocab_size,
    dim=32,
    ffn_dim=64,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
  )
  root = tmp_path_factory.mktemp("export")
  params = _random_params(cfg, str(root / "init"))
  prompt = TOK.encode_dialog([(m["role"], m["content"]) for m in _DIALOGS[0]])
  free = sampler.generate(model_from_params(cfg, params), [prompt], max_new_tokens=NEW).tokens[0]
  firsts = [i for i, t in enumerate(free) if t not in free[:i]]
  k = firsts[len(firsts) // 2]
  eot, emitted = TOK.special_id("<|eot_id|>"), free[k]
  head = np.array(params["lm_head"])
  head[:, [emitted, eot]] = head[:, [eot, emitted]]
  params["lm_head"] = head
  ckpt = str(root / "run" / "checkpoints")
  manager.save_params_checkpoint(ckpt, cfg, params, step=7, config={"data": {"tokenizer": ""}})
  out = str(root / "hf")
  summary = export_hf(ckpt, out)
  return {"dir": out, "ckpt": ckpt, "prompt": prompt, "k": k, "summary": summary}


def test_export_files(export):
  names = set(os.listdir(export["dir"]))
  assert set(hf_tokenizer.FILES) <= names and "config.json" in names
  gen = json.load(open(os.path.join(export["dir"], "generation_config.json")))
  assert gen["bos_token_id"] == TOK.bos_id and gen["eos_token_id"] == list(TOK.stop_ids)
  assert gen["pad_token_id"] == TOK.pad_id
  config = json.load(open(os.path.join(export["dir"], "config.json")))
  assert config["eos_token_id"] == list(TOK.stop_ids)


def test_auto_tokenizer_matches_project_tokenizer(export):
  tk = transformers.AutoTokenizer.from_pretrained(export["dir"])
  assert len(tk) == TOK.vocab_size
  assert tk.convert_tokens_to_ids(list(SPECIAL_NAMES)) == list(range(TOK.n_ranks, TOK.vocab_size))
  assert (tk.bos_token_id, tk.eos_token_id, tk.pad_token_id) == (
    TOK.bos_id,
    TOK.special_id("<|eot_id|>"),
    TOK.pad_id,
  )
  for text in _stdlib_sample():
    ids = tk(text).input_ids
    assert ids == TOK.encode(text, bos=True)
    assert tk.decode(ids) == TOK.decode(ids) and tk.decode(ids, skip_special_tokens=True) == text
  for text in _traces():  # trace markers are specials on both sides
    ids = tk(text, add_special_tokens=False).input_ids
    assert ids == TOK.encode_trace(text) and tk.decode(ids) == text
  for dialog in _DIALOGS:
    text = tk.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    ids = tk(text, add_special_tokens=False).input_ids
    assert ids == formats.chat_example(TOK, dialog)[0] + TOK.header("assistant")
    if not any("reasoning" in m for m in dialog):
      assert ids == TOK.encode_dialog([(m["role"], m["content"]) for m in dialog])
    complete = tk.apply_chat_template(dialog, tokenize=False)
    assert tk(complete, add_special_tokens=False).input_ids == formats.chat_example(TOK, dialog)[0]


def test_generate_equals_sampler(export):
  """transformers' greedy generate, configured only by the export's generation_config.json,
  equals the project's sampler (stop ids from the tokenizer) on the same checkpoint."""
  model = transformers.AutoModelForCausalLM.from_pretrained(export["dir"], dtype=torch.float32)
  assert model.generation_config.eos_token_id == list(TOK.stop_ids)
  assert not model.generation_config.do_sample
  ours, tok = loading.load_for_inference(export["ckpt"])
  prompts = [export["prompt"], TOK.encode("def fib(n):\n  ", bos=True)]
  got = sampler.generate(ours, prompts, max_new_tokens=NEW, stop_ids=tok.stop_ids).tokens
  for prompt, mine in zip(prompts, got):
    with torch.no_grad():
      out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW,
      )
    assert out[0, len(prompt) :].tolist() == mine
  assert got[0][-1] == TOK.special_id("<|eot_id|>") and len(got[0]) == export["k"] + 1
