"""An lm-evaluation-harness model over the project's scorer and sampler.

  python -c "import cwm_jax.infer.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" \
      run --model cwm_jax --model_args checkpoint=DIR[,batch_size=8,max_length=2047] --tasks ...

(after `import cwm_jax.infer.lm_eval_adapter`, which registers the name `cwm_jax`; from Python:
`lm_eval.simple_evaluate(model=CwmLM(checkpoint=DIR), tasks=[...])`). Any checkpoint the
project loads works (orbax workdir, Hugging Face or Meta), with its tokenizer.

- `loglikelihood`: log p(continuation | context) and whether greedy decoding would produce
  it, teacher-forced by `evaluation.score` (the same scorer as `evaluate`'s perplexity). The
  pair is encoded as lm-eval's own models do: the whole string at once, the continuation
  being what follows the context's tokens (trailing spaces of the context move to the
  continuation), so a token that spans the boundary is not split.
- `loglikelihood_rolling`: a document's total log-likelihood from `<|begin_of_text|>` on, in
  windows of `max_length` tokens (lm-eval's rolling windows).
- `generate_until`: the project's sampler (greedy unless `do_sample`/`temperature` ask),
  stopping at the checkpoint's stop ids and cut at the first `until` string.

lm-eval is not a dependency of the package (the `test` extra installs it); this module imports
it at the top, and nothing else in the package imports this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cwm_jax.base import ConfigError
from cwm_jax.infer import evaluation, loading, sampler


@register_model("cwm_jax")
class CwmLM(LM):
  """lm-eval's LM interface for a cwm_jax model: `checkpoint=DIR` (loaded with its tokenizer),
  or an already built `model` and `tokenizer`."""

  def __init__(
    self,
    checkpoint: str | None = None,
    model=None,
    tokenizer=None,
    batch_size: int | str = 8,
    max_length: int | str | None = None,
    max_gen_toks: int | str = 256,
    step: int | str | None = None,
    tokenizer_path: str | None = None,
    **unused: Any,
  ):
    super().__init__()
    if model is None:
      if not checkpoint:
        raise ConfigError("CwmLM needs checkpoint=DIR (or model= and tokenizer=)")
      model, tokenizer = loading.load_for_inference(
        checkpoint, None if step is None else int(step), tokenizer_path
      )
    if tokenizer is None:
      raise ConfigError("CwmLM(model=...) needs its tokenizer= as well")
    self.model, self.tok = model, tokenizer
    self.batch_size_per_call = int(batch_size) if str(batch_size) != "auto" else 8
    # A scored row is max_length + 1 tokens: max_length predictions, as lm-eval's models count.
    self.max_length = int(max_length) if max_length else model.cfg.max_seq_len - 1
    self.max_gen_toks = int(max_gen_toks)
    if self.batch_size_per_call < 1 or self.max_length < 2 or self.max_gen_toks < 1:
      raise ConfigError("CwmLM: batch_size >= 1, max_length >= 2 and max_gen_toks >= 1 please")

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids): the whole string is encoded once."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tok.encode(context + continuation, bos=True)
    ctx = self.tok.encode(context, bos=True)
    return whole[: len(ctx)], whole[len(ctx) :]

  def _score(self, pieces: list[tuple[list[int], list[int]]]) -> np.ndarray:
    """[n, 3] (NLL, tokens, greedy-correct) of each continuation after its context, the
    context cut from the left so that at most `max_length` tokens are predicted from."""
    seqs, weights = [], []
    for ctx, cont in pieces:
      if not cont:
        raise ValueError("lm-eval asked for the likelihood of an empty continuation")
      if len(cont) > self.max_length:
        raise ValueError(
          f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}"
        )
      seq = (ctx + cont)[-(self.max_length + 1) :]
      seqs.append(seq)
      weights.append([0.0] * (len(seq) - len(cont)) + [1.0] * len(cont))
    return evaluation.score(
      self.model, seqs, weights, batch_size=self.batch_size_per_call, max_tokens=self.max_length + 1
    )

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    sums = self._score([self._pair(*r.args) for r in requests])
    return [(-float(nll), bool(correct == n)) for nll, n, correct in sums]

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for r in requests:
      ids = self.tok.encode(r.args[0])
      windows = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(
          token_list=ids, prefix_token=self.tok.bos_id, max_seq_len=self.max_length, context_len=1
        )
      ]
      out.append(-float(self._score(windows)[:, 0].sum()) if windows else 0.0)
    return out

  def generate_until(self, requests) -> list[str]:
    out = []
    for r in requests:
      context, kwargs = r.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      sample = kwargs.pop("do_sample", False)
      temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
      prompt = self.tok.encode(context, bos=True)
      prompt = prompt[-max(1, self.max_length - max_new) :]
      ids = sampler.generate(
        self.model,
        [prompt],
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=float(kwargs.pop("top_p", 1.0)),
        stop_ids=self.tok.stop_ids,
      ).tokens[0]
      text = self.tok.decode([i for i in ids if not self.tok.is_special(i)])
      for stop in until:
        if stop and stop in text:
          text = text[: text.index(stop)]
      out.append(text)
    return out
