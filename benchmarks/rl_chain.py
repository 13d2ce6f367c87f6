"""The smoke chain pretrain -> midtrain -> sft, then RL on output prediction: pass rate on
held-out programs before and after RL, its standard error, and rollout tokens/s.

  python benchmarks/rl_chain.py [--workdir DIR] [--rl_steps N] [--held_out N] [--save]

Runs configs/smoke.py:schedule=all (the main job's three stages), then two stages of the RL
trainer on generated output-prediction tasks (`cwm_jax.rl.output_tasks`: short functions of an
int, a string or a list with random constants; each value computed by running the program in
the sandbox): `warmup` (`rl.warmup_steps` supervised steps on the training split's reference
values, from the SFT model, whose own rate is `greedy_held_out_sft`) and `rl` (GRPO from the
warmup model, sampled at `--temperature`, rewarded by `assert f(INPUT) == PREDICTION` through
the sandbox's harness).

Evaluation on `--held_out` tasks whose programs are in the held-out split (no held-out program
text is in the training split): before RL (the warmup model) and after, `held_out_*` is pass@1
at the RL sampling temperature (the fraction of `--eval_samples` completions per task, sampled
with one fixed seed, that pass) and `greedy_*` the greedy completion's pass rate. Improvements
are paired (the same tasks): the mean per-task difference and its standard error.
`greedy_answers_*` count the distinct greedy answers: a policy that learned per-template
guesses rather than reading the input shows few. Prints one JSON object; `--save` also writes
it to benchmarks/results/rl_chain/ (benchmarks/results_io.py).
"""

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results_io  # noqa: E402
import smoke  # noqa: E402  pylint: disable=wrong-import-position

from cwm_jax.checkpoint.load import load_params  # noqa: E402
from cwm_jax.data.tokenizer import Tokenizer  # noqa: E402
from cwm_jax.infer.sampler import generate  # noqa: E402
from cwm_jax.model import model_from_params  # noqa: E402
from cwm_jax.recipe import schedule, stages  # noqa: E402
from cwm_jax.rl import output_tasks, rollout  # noqa: E402
from cwm_jax.rl import tasks as tasks_lib  # noqa: E402
from cwm_jax.train.config import model_config  # noqa: E402


def completions(model, tasks, tok, max_new: int, samples: int, temperature: float, seed: int):
  """`samples` completions of each task (greedy when `temperature` is 0), task by task."""
  out = generate(
    model,
    [list(t.prompt_ids) for t in tasks for _ in range(samples)],
    max_new_tokens=max_new,
    temperature=temperature,
    stop_ids=tok.stop_ids,
    seed=seed,
    pad_multiple=64,
  )
  return [rollout.completion_text(tok.decode, ids, tok.stop_ids) for ids in out.tokens]


def evaluate(cfg, ckpt_dir: str, tasks, tok, scorer, args, sampled: bool = True) -> dict:
  """Held-out verdicts of a checkpoint's params run with the RL stages' architecture `cfg`
  (the same weights; the RL stages widen the windows): whether each task's greedy completion
  passes, and the fraction of `args.eval_samples` completions sampled at the RL temperature
  (one fixed seed for every checkpoint) that pass."""
  model = model_from_params(cfg, load_params(ckpt_dir)[1])
  texts = completions(model, tasks, tok, args.max_new, 1, 0.0, 0)
  out = {"greedy": [v.passed for v in scorer(tasks, texts)], "texts": texts}
  if sampled:
    k = args.eval_samples
    texts = completions(model, tasks, tok, args.max_new, k, args.temperature, args.seed + 1)
    passed = [v.passed for v in scorer([t for t in tasks for _ in range(k)], texts)]
    out["sampled"] = np.asarray(passed, np.float64).reshape(len(tasks), k).mean(axis=1)
  return out


def answers(texts: list[str]) -> dict:
  """How varied the greedy answers are: a policy that collapsed to one answer for every
  program shows as 1 distinct answer with share 1.0."""
  counts = collections.Counter(t.strip() for t in texts)
  return {"distinct": len(counts), "top_share": counts.most_common(1)[0][1] / len(texts)}


def paired(before, after) -> dict:
  """Pass rates before and after on the same tasks, the mean per-task difference and its
  standard error (a paired comparison)."""
  b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
  d = a - b
  se = float(d.std(ddof=1) / math.sqrt(len(d)))
  return {
    "before": float(b.mean()),
    "after": float(a.mean()),
    "improvement": float(d.mean()),
    "se": se,
    "improvement_over_se": float(d.mean()) / se if se > 0 else None,
  }


def rl_schedule(args, task_file: str, stage: str):
  """The smoke schedule plus stages `warmup` (supervised on reference values) and `rl`
  (GRPO), `stage` selected; both run the RL trainer on `task_file`."""
  c = smoke.add_rl_stage(smoke.get_config("schedule=all"))
  c.rl.update(
    task_files=task_file,
    group_size=args.group_size,
    max_new_tokens=args.max_new,
    warmup_steps=args.warmup_steps if stage == "warmup" else 0,
    temperature=args.temperature,
    verifier_workers=args.verifier_workers,
    sandbox_timeout_s=5.0,
  )
  common = dict(
    seq_len=args.seq_len,
    global_window=128,
    rope_scaling=True,
    mesh=dict(data=-1, fsdp=1),
    trainer="rl",
  )
  c.schedule.stages.warmup = dict(
    common,
    batch_size=args.warmup_batch,
    steps=args.warmup_steps,
    start_from="previous",
    optimizer=dict(lr=args.warmup_lr, warmup_steps=5, schedule="constant", weight_decay=0.0),
  )
  c.schedule.stages.rl = dict(
    common,
    batch_size=args.batch_size,
    steps=args.rl_steps,
    start_from="previous",
    optimizer=dict(lr=args.lr, warmup_steps=args.lr_warmup, schedule="constant", weight_decay=0.0),
  )
  c.schedule.order = ",".join((*smoke.STAGES, "warmup", "rl"))
  c.schedule.only = stage
  return c


def mean_of(records: list[dict], key: str) -> float:
  values = [r[key] for r in records if key in r]
  return float(np.mean(values)) if values else 0.0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="")
  parser.add_argument("--train_tasks", type=int, default=2000)
  parser.add_argument("--held_out", type=int, default=2048)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--warmup_steps", type=int, default=100)
  parser.add_argument("--warmup_batch", type=int, default=32)
  parser.add_argument("--warmup_lr", type=float, default=1e-3)
  parser.add_argument("--rl_steps", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--lr_warmup", type=int, default=5)
  # Sandbox runs wait on process start-up as much as on the CPU: more workers than cores help.
  parser.add_argument("--verifier_workers", type=int, default=8)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--eval_samples", type=int, default=4)
  parser.add_argument("--max_new", type=int, default=6)
  parser.add_argument("--seq_len", type=int, default=80)
  parser.add_argument("--save", action="store_true", help="write benchmarks/results/rl_chain/")
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="rl_chain_")
  t0 = time.perf_counter()
  config = smoke.get_config("schedule=all")
  config.schedule.finish = False
  schedule.run(config, workdir)
  chain_s = time.perf_counter() - t0

  tok = Tokenizer.default()
  train = output_tasks.records(args.train_tasks, "train", args.seed)
  held = output_tasks.records(args.held_out, "held_out", args.seed)
  task_file = os.path.join(workdir, "output_train.jsonl")
  with open(task_file, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train)
  held_tasks = [tasks_lib.output_task(r, tok) for r in held]
  warm, rl = (rl_schedule(args, task_file, s) for s in ("warmup", "rl"))
  cfg = model_config(stages.stage_config(rl, len(smoke.STAGES) + 1, workdir))
  scorer = rollout.Scorer(args.verifier_workers)
  ckpt = lambda stage: os.path.join(workdir, stage, "checkpoints")
  sft = evaluate(cfg, ckpt("sft"), held_tasks, tok, scorer, args, sampled=False)
  t1 = time.perf_counter()
  schedule.run(warm, workdir)
  warmup_s = time.perf_counter() - t1
  before = evaluate(cfg, ckpt("warmup"), held_tasks, tok, scorer, args)
  t2 = time.perf_counter()
  results = schedule.run(rl, workdir)
  rl_s = time.perf_counter() - t2
  after = evaluate(cfg, ckpt("rl"), held_tasks, tok, scorer, args)
  scorer.close()
  records = results["rl"]["records"] if isinstance(results.get("rl"), dict) else []
  sampled, greedy = (
    paired(before["sampled"], after["sampled"]),
    paired(before["greedy"], after["greedy"]),
  )
  result = {
    "benchmark": "rl_chain",
    "task_family": "output prediction of generated short functions (rl.output_tasks)",
    "metric": (
      f"pass@1 on held-out tasks: the fraction of {args.eval_samples} completions per task "
      f"sampled at temperature {args.temperature} (the RL sampling temperature; fixed seed) "
      "that pass; greedy_* fields: the greedy completion"
    ),
    "train_tasks": len(train),
    "held_out_tasks": len(held),
    "held_out_before": sampled["before"],
    "held_out_after": sampled["after"],
    "improvement": sampled["improvement"],
    "improvement_se": sampled["se"],
    "improvement_over_se": sampled["improvement_over_se"],
    "greedy_held_out_sft": float(np.mean(sft["greedy"])),
    "greedy_held_out_before": greedy["before"],
    "greedy_held_out_after": greedy["after"],
    "greedy_improvement": greedy["improvement"],
    "greedy_improvement_se": greedy["se"],
    "greedy_answers_before": answers(before["texts"]),
    "greedy_answers_after": answers(after["texts"]),
    "warmup_steps": args.warmup_steps,
    "warmup_lr": args.warmup_lr,
    "rl_steps": args.rl_steps,
    "batch_size": args.batch_size,
    "group_size": args.group_size,
    "lr": args.lr,
    "temperature": args.temperature,
    "train_pass_first10": mean_of(records[:10], "pass_rate"),
    "train_pass_last10": mean_of(records[-10:], "pass_rate"),
    "updates_skipped": int(sum(r.get("skipped", 0) for r in records)),
    "rollout_tokens_per_sec": mean_of(records, "rollout_tokens_per_sec"),
    "chain_s": round(chain_s, 1),
    "warmup_s": round(warmup_s, 1),
    "rl_s": round(rl_s, 1),
    "wall_s": round(time.perf_counter() - t0, 1),
  }
  print(json.dumps(result))
  if args.save:
    print(results_io.save("rl_chain", result), file=sys.stderr)


if __name__ == "__main__":
  main()
