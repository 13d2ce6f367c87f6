"""RL on the toy verifiable task: mean reward before/after a few dozen GRPO updates.

  python benchmarks/rl_toy.py [--steps 40] [--seed 0] [--save]

Task: `<bos>` + two tokens, filler letters and one digit; reward +1 iff the one generated
token is that digit (chance 1/16). A 1-layer model from random init; 16 prompts x G=8
samples per update. Prints one JSON object: sampled mean reward over the first and last 5
updates, and greedy pass rate / mean reward on all 64 toy prompts before and after. `--save`
also writes it under benchmarks/results/rl_toy/ (`results_io`).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
)
import results_io
import rl_digits

from cwm_jax.checkpoint.manager import restore_params
from cwm_jax.infer.sampler import generate
from cwm_jax.model.transformer import init_model, model_from_params
from cwm_jax.rl import tasks, trainer
from cwm_jax.train.config import model_config


def greedy_eval(model, seed: int) -> dict:
  vocab, toy = tasks.DigitVocab(), tasks.digit_tasks(seed=seed)
  out = generate(
    model,
    [list(t.prompt_ids) for t in toy],
    max_new_tokens=1,
    stop_ids=vocab.stop_ids,
    pad_multiple=1,
  )
  verdicts = [t.verify(vocab.decode(ids)) for t, ids in zip(toy, out.tokens)]
  return {
    "pass_rate": float(np.mean([v.passed for v in verdicts])),
    "mean_reward": float(np.mean([v.value for v in verdicts])),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  args = parser.parse_args()
  config = rl_digits.get_config(f"steps={args.steps},seed={args.seed}")
  cfg = model_config(config)
  before = greedy_eval(init_model(cfg, args.seed), args.seed)  # the RL run's initial params
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    out = trainer.run(config, workdir)
    wall = time.perf_counter() - t0
    _, params = restore_params(os.path.join(workdir, "checkpoints"))
  after = greedy_eval(model_from_params(cfg, params), args.seed)
  rewards = [r["reward_mean"] for r in out["records"]]
  result = {
    "benchmark": "rl_toy",
    "task": "digit in prompt (16-token vocab, chance 1/16)",
    "model": "1 layer, dim 32, random init",
    "updates": args.steps,
    "rollouts_per_update": config.batch_size,
    "group_size": config.rl.group_size,
    "sampled_reward_first5": round(float(np.mean(rewards[:5])), 3),
    "sampled_reward_last5": round(float(np.mean(rewards[-5:])), 3),
    "greedy_before": before,
    "greedy_after": after,
    "updates_skipped": int(sum(r["skipped"] for r in out["records"])),
    "wall_s_including_compile": round(wall, 1),
  }
  print(json.dumps(result))
  if args.save:
    print("saved", results_io.save("rl_toy", result), file=sys.stderr)


if __name__ == "__main__":
  main()
