"""The lm-evaluation-harness adapter: its loglikelihood, loglikelihood_rolling and
generate_until equal transformers' on the same checkpoint, and lm_eval runs local task files
(no hub) through it.

Reference: a transformers CwmForCausalLM (log_softmax of its logits, its greedy generate).
"""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance

from cwm_jax.checkpoint.hf import config_to_hf
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.infer.lm_eval_adapter import CwmLM
from cwm_jax.model import tiny

TOK = Tokenizer.default()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(transformers model, adapter) over one random tiny checkpoint with the project's vocab."""
  cfg = tiny(
    n_layers=2,
    local_window=8,
    global_window=256,
    vocab_size=TOK.vocab_size,
    dim=32,
    ffn_dim=64,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
  )
  torch.manual_seed(0)
  hf = transformers.CwmForCausalLM(transformers.CwmConfig(**config_to_hf(cfg, "float32")))
  with torch.no_grad():
    for p in hf.parameters():
      if p.dim() > 1:
        p.normal_(0, 0.2)
  path = str(tmp_path_factory.mktemp("hf"))
  hf.save_pretrained(path)
  return hf.eval(), CwmLM(checkpoint=path, batch_size=4, max_length=64, max_gen_toks=12)


def _logprobs(hf, ids):
  with torch.no_grad():
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_transformers(pair):
  """Continuation log-probs and greedy flags; the pair is encoded whole (lm-eval's rule:
  trailing spaces of the context belong to the continuation), the context cut from the left
  to 64 predicted positions."""
  hf, lm = pair
  cases = [
    ("def add(a, b):\n  return", " a + b"),
    ("x = [1, 2, 3]\nprint(len(x)) # ", "3"),
    ("The answer is ", "42."),
    ("import os\n" * 30, "os.getcwd()"),
  ]
  got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in cases])
  for (context, continuation), (ll, greedy) in zip(cases, got):
    stripped = context.rstrip()
    whole = TOK.encode(context + continuation, bos=True)
    targets = whole[len(TOK.encode(stripped, bos=True)) :]
    seq = whole[-65:]
    logp = _logprobs(hf, seq[:-1])[-len(targets) :]
    assert ll == pytest.approx(float(logp[np.arange(len(targets)), targets].sum()), abs=2e-3)
    assert greedy == bool((logp.argmax(-1) == targets).all())
  assert len(TOK.encode(cases[-1][0] + cases[-1][1])) > 65  # the last case was cut


def test_loglikelihood_rolling_matches_transformers(pair):
  """A document's log-likelihood from BOS on, in windows of 64 predictions, each token seen
  with the (up to 64) tokens before it in its window."""
  hf, lm = pair
  texts = ["def f(n):\n  return n * 2\n", "for i in range(10):\n  print(i, i ** 2)\n" * 6]
  got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
  for text, value in zip(texts, got):
    ids = TOK.encode(text)
    padded = [TOK.bos_id] + ids
    expected = 0.0
    for s in range(0, len(ids), 64):
      e = min(s + 64, len(ids))
      start = max(0, e - 64)
      logp = _logprobs(hf, padded[start:e])
      expected += sum(float(logp[j - start, padded[j + 1]]) for j in range(s, e))
    assert value == pytest.approx(expected, abs=5e-3)
  assert len(TOK.encode(texts[1])) > 64  # several windows


def test_generate_until_matches_transformers(pair):
  hf, lm = pair
  contexts = ["def fib(n):\n", "# a comment\nx ="]
  got = lm.generate_until(
    [_req("generate_until", c, {"until": ["\n\n"], "max_gen_toks": 12}) for c in contexts]
  )
  for context, text in zip(contexts, got):
    prompt = TOK.encode(context, bos=True)
    with torch.no_grad():
      out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=list(TOK.stop_ids),
      )
    ids = [i for i in out[0, len(prompt) :].tolist() if not TOK.is_special(i)]
    assert text == TOK.decode(ids).split("\n\n")[0]


def test_simple_evaluate_runs_local_tasks(pair, tmp_path, monkeypatch):
  """A multiple-choice task and a generation task from local JSONL files, through lm_eval's
  own task loading and metrics (offline: no hub)."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _, lm = pair
  docs = [
    {"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0}
    for a, b in ((1, 2), (3, 4), (10, 5))
  ]
  data = tmp_path / "arith.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "mc.yaml").write_text(
    "task: cwm_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
    "metric_list:\n  - metric: acc\n"
  )
  (tmp_path / "gen.yaml").write_text(
    "task: cwm_local_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    f"    test: {data}\ntest_split: test\noutput_type: generate_until\n"
    'doc_to_text: "{{question}} Answer:"\ndoc_to_target: "{{choices[0]}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
    "metric_list:\n  - metric: exact_match\n"
  )
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  manager = TaskManager(include_path=str(tmp_path))
  out = lm_eval.simple_evaluate(
    model=lm, tasks=["cwm_local_mc", "cwm_local_gen"], task_manager=manager, log_samples=True
  )
  mc, gen = out["results"]["cwm_local_mc"], out["results"]["cwm_local_gen"]
  scores = lm.loglikelihood(
    [_req("loglikelihood", d["question"], " " + c) for d in docs for c in d["choices"]]
  )
  expected = np.mean([scores[2 * i][0] > scores[2 * i + 1][0] for i in range(len(docs))])
  assert mc["acc,none"] == pytest.approx(expected)
  assert 0.0 <= gen["exact_match,none"] <= 1.0 and len(out["samples"]["cwm_local_gen"]) == 3
