"""KV-cache sampler: decode tokens/s vs transformers' generate, 32B cache GiB, compile s.

Greedy decode tokens/s of our sampler against transformers' `generate`, the KV-cache
memory of CWM 32B with and without ring buffers, and the sampler's compile time per depth.

  python benchmarks/sampler.py                          # prints one JSON object
  python benchmarks/sampler.py --batches 8 --rounds 5   # decode comparison at batch 8 only
  python benchmarks/sampler.py --compile_layers 16,64   # adds compile seconds per depth
  python benchmarks/sampler.py --save                   # also benchmarks/results/sampler/

Decode: one random float32 model of the d512 config (benchmarks/train_step.py: d=512,
4 layers, 8/2 heads of 64, ffn 1536, vocab 8192, windows 1024/256/256/1024) is built as
a transformers `CwmForCausalLM`, saved, and loaded into ours through the checkpoint
reader (`cwm_jax.checkpoint.load.load_params`), so both sides run the same weights. Per batch
size, the same random prompts (length `--prompt`) are extended by exactly `--new` tokens
by our `cwm_jax.infer.sampler.generate` (greedy, no stop ids) and by transformers'
`generate` (`do_sample=False`, `use_cache=True`, no eos), on `--threads` torch threads.
After a warm-up call of each, rounds alternate ours, theirs, ... so a shared machine's
load hits both alike. Both run in this one process, which keeps freed host memory for
reuse as our programs do on a CPU (`cwm_jax.host_memory`; `host_malloc` in the output).
Reported per batch size: tokens/s = batch * new / seconds of a whole `generate` call
(prefill included, as for a user), median over rounds; `ratio`,
the median of the per-round ratios ours / transformers; where each side's time goes: the
median seconds of a one-token call (`one_token_call_s`: the prefill and one step, timed in
the same alternating rounds), the milliseconds of each further step (`decode_step_ms`:
the whole call minus the one-token call, over `new - 1` steps) and their ratio
(`decode_steps_ratio`; with `--new 1` only the call itself); our compile seconds (first
call minus a warm call); `first_tokens_agree`, whether both sides' first 8 tokens match, and
`agreeing_prefix_min`, the shortest agreeing prefix of a row (greedy on a random model:
float rounding may part the two at a near-tie).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax import host_memory
from cwm_jax.infer import cache as kv
from cwm_jax.infer import sampler
from cwm_jax.model import abstract_model, cwm_32b, model_from_params, tiny

AGREE_TOKENS = 8  # leading generated tokens compared between the two sides
SETTLE_S = 0.5  # idle gap before each timed call: the other side's threads stop spinning


def cache_gib(cfg, batch, cache_len):
  c = jax.eval_shape(lambda: kv.init_cache(cfg, batch, cache_len, jnp.bfloat16))
  return sum(np.prod(x.shape) * 2 for x in c.k + c.v) / 2**30


def same_models(config_name="d512"):
  """(ours, transformers') float32 models holding the same random weights."""
  import torch
  import transformers
  from train_step import model_config

  from cwm_jax.checkpoint.hf import config_to_hf
  from cwm_jax.checkpoint.load import load_params

  torch.manual_seed(0)
  hf_cfg = transformers.CwmConfig(**config_to_hf(model_config(config_name), dtype="float32"))
  theirs = transformers.CwmForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    theirs.save_pretrained(d)
    cfg, params = load_params(d)
  return model_from_params(cfg, params), theirs


def _timed(call):
  t0 = time.perf_counter()
  out = call()
  return time.perf_counter() - t0, out


def decode_vs_transformers(ours_model, theirs_model, batch, prompt, new, rounds):
  """Alternating timed rounds of both `generate`s on the same prompts; one JSON-ready dict."""
  import torch

  prompts_BP = np.random.RandomState(batch).randint(0, ours_model.cfg.vocab_size, (batch, prompt))
  ids_BP = torch.as_tensor(prompts_BP, dtype=torch.long)

  def ours(n=new):
    res = sampler.generate(ours_model, prompts_BP.tolist(), max_new_tokens=n)
    return np.asarray(res.tokens)

  def theirs(n=new):
    with torch.inference_mode():
      out = theirs_model.generate(
        ids_BP,
        attention_mask=torch.ones_like(ids_BP),
        do_sample=False,
        use_cache=True,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
      )
    return out[:, prompt:].numpy()

  first_s, ours_BN = _timed(ours)
  warm_s, _ = _timed(ours)
  theirs_BN = theirs()  # warm-ups, the one-token calls' too
  ours(1)
  theirs(1)
  if ours_BN.shape != (batch, new) or theirs_BN.shape != (batch, new):
    raise RuntimeError(
      f"expected {new} new tokens per row, got {ours_BN.shape} (ours) and "
      f"{theirs_BN.shape} (transformers)"
    )
  calls = {
    "ours": ours,
    "transformers": theirs,
    "ours_one": lambda: ours(1),
    "transformers_one": lambda: theirs(1),
  }
  secs = {k: [] for k in calls}
  for _ in range(rounds):
    for k, call in calls.items():
      time.sleep(SETTLE_S)
      secs[k].append(_timed(call)[0])
  med = {k: statistics.median(v) for k, v in secs.items()}
  rate = lambda side: round(batch * new / med[side], 1)
  # A one-token call is the prefill plus one step; the other new - 1 steps make up the rest.
  step_ms = lambda side: (med[side] - med[side + "_one"]) / (new - 1) * 1e3
  sides = ("ours", "transformers")
  split = {"one_token_call_s": {side: round(med[side + "_one"], 3) for side in sides}}
  if new > 1:
    split.update(
      decode_step_ms={side: round(step_ms(side), 2) for side in sides},
      decode_steps_ratio=round(step_ms("transformers") / step_ms("ours"), 2),
    )
  agree = ours_BN[:, :AGREE_TOKENS] == theirs_BN[:, :AGREE_TOKENS]
  return {
    "batch": batch,
    "prompt": prompt,
    "new": new,
    "rounds": rounds,
    "tokens_per_s": {"ours": rate("ours"), "transformers": rate("transformers")},
    "ratio": round(statistics.median(t / o for o, t in zip(secs["ours"], secs["transformers"])), 2),
    **split,
    "ours_compile_s": round(first_s - warm_s, 2),
    "first_tokens_agree": bool(agree.all()),
    "first_tokens_compared": AGREE_TOKENS,
    "agreeing_prefix_min": int(
      np.argmin(np.pad(ours_BN == theirs_BN, ((0, 0), (0, 1))), axis=1).min()
    ),
  }


def decode_section(args):
  import torch

  torch.set_num_threads(args.threads)
  ours_model, theirs_model = same_models()
  out = {
    "config": "d512",
    "dtype": "float32",
    "threads": args.threads,
    "model_params": ours_model.cfg.param_count(),
    "transformers_attn_implementation": theirs_model.config._attn_implementation,
  }
  out["runs"] = [
    decode_vs_transformers(ours_model, theirs_model, b, args.prompt, args.new, args.rounds)
    for b in (int(b) for b in args.batches.split(","))
  ]
  return out


def _first_and_second(call) -> tuple[float, float]:
  """Seconds of a first call (trace + compile + run) and of a second (run only)."""
  times = [_timed(call)[0] for _ in range(2)]
  return times[0], times[1]


def _random_model(cfg, seed=0):
  rng = np.random.RandomState(seed)
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  return model_from_params(
    cfg, jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)
  )


def compile_seconds(n_layers, new=8):
  """First `generate` call (trace + compile + run) minus a second call (run only), for a
  tiny-width model of `n_layers` layers (Meta's pattern: every 4th and the last global)."""
  cfg = tiny(n_layers=n_layers)
  model = _random_model(cfg)
  prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
  first, run = _first_and_second(lambda: sampler.generate(model, prompts, max_new_tokens=new))
  return {
    "n_layers": n_layers,
    "new": new,
    "first_call_s": round(first, 2),
    "run_s": round(run, 3),
    "compile_s": round(first - run, 2),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
  parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
  parser.add_argument("--new", type=int, default=128, help="generated tokens per row")
  parser.add_argument("--rounds", type=int, default=3, help="timed calls per side")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument(
    "--compile_layers",
    default="",
    help="comma-separated depths, e.g. 16,64: report compile seconds per depth",
  )
  parser.add_argument(
    "--skip_decode", action="store_true", help="skip the decode-throughput and cache-memory figures"
  )
  parser.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  args = parser.parse_args()
  retained = host_memory.retain()  # as our programs run; torch, in this process, shares it
  out = {
    "device": jax.devices()[0].device_kind,
    "host_malloc": "retained" if retained else "system",
  }
  if not args.skip_decode:
    big = cwm_32b()
    full = big.replace(layer_windows=(big.global_window,) * big.n_layers)
    out.update(
      {
        "cwm32b_cache_gib_bf16_b1_131072": round(cache_gib(big, 1, 131072), 2),
        "cwm32b_cache_gib_without_ring_buffers": round(cache_gib(full, 1, 131072), 2),
        "decode": decode_section(args),
      }
    )
  if args.compile_layers:
    depths = [int(n) for n in args.compile_layers.split(",")]
    compile_seconds(1)  # warm-up: the process's first jit also pays one-off backend setup
    out["compile"] = [compile_seconds(n) for n in depths]
  print(json.dumps(out))
  if args.save:
    print("saved", results_io.save("sampler", out), file=sys.stderr)


if __name__ == "__main__":
  main()
