"""The smoke chain pretrain -> midtrain -> sft -> rl: trace-prediction reward on held-out
programs before and after RL, and rollout tokens/s.

  python benchmarks/rl_chain.py [--workdir DIR] [--rl_steps 30] [--max_new 96]

Runs configs/smoke.py:schedule=all (the main job's three stages), then an RL stage that
starts from the SFT model and trains on trace-prediction tasks made from the traced corpus
the chain built (`rl.datasets.trace_records_from_corpus`; held-out programs are not in it).
Tasks whose whole trace fits `--max_new` tokens are kept, so the reward (+1 iff the predicted
trace ends in the interpreter's final event and value) is reachable. Evaluation: greedy
reward on the held-out programs' calls, before (SFT model) and after RL. Prints one JSON
object.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "configs"))

import smoke  # noqa: E402  pylint: disable=wrong-import-position

from cwm_jax.checkpoint.load import load_params  # noqa: E402
from cwm_jax.data.tokenizer import Tokenizer  # noqa: E402
from cwm_jax.data.traces import examples  # noqa: E402
from cwm_jax.infer.sampler import generate  # noqa: E402
from cwm_jax.model import model_from_params  # noqa: E402
from cwm_jax.recipe import schedule, stages  # noqa: E402
from cwm_jax.rl import datasets  # noqa: E402
from cwm_jax.train.config import model_config  # noqa: E402


def _fits(tok, record, max_prompt, max_new) -> bool:
  try:
    task = datasets.task_from_record(record, tok)
  except datasets.BadTask:
    return False
  return len(task.prompt_ids) <= max_prompt and len(task.reference_ids) < max_new


def held_out_records() -> list[dict]:
  return [
    {
      "id": f"heldout/{c.function}{c.args!r}",
      "kind": "trace",
      "source": c.source,
      "function": c.function,
      "args": list(c.args),
      "kwargs": dict(c.kwargs),
    }
    for c in examples.program_calls()
    if examples.is_held_out(c.origin)
  ]


def greedy_reward(cfg, ckpt_dir: str, records, tok, max_new: int) -> dict:
  """Greedy reward of a checkpoint's params run with the RL stage's architecture `cfg` (the
  same weights; the RL stage widens the windows to its context)."""
  model = model_from_params(cfg, load_params(ckpt_dir)[1])
  tasks = [datasets.task_from_record(r, tok) for r in records]
  out = generate(
    model,
    [list(t.prompt_ids) for t in tasks],
    max_new_tokens=max_new,
    stop_ids=tok.stop_ids + (tok.eos_id,),
    pad_multiple=64,
  )
  verdicts = [t.verify(tok.decode(ids)) for t, ids in zip(tasks, out.tokens)]
  return {
    "tasks": len(tasks),
    "mean_reward": float(np.mean([v.value for v in verdicts])),
    "pass_rate": float(np.mean([v.passed for v in verdicts])),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="")
  parser.add_argument("--rl_steps", type=int, default=30)
  parser.add_argument("--max_new", type=int, default=96)
  parser.add_argument("--seq_len", type=int, default=640)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="rl_chain_")
  tok, max_prompt = Tokenizer.default(), args.seq_len - args.max_new
  t0 = time.perf_counter()
  config = smoke.get_config("schedule=all")
  config.schedule.finish = False
  schedule.run(config, workdir)
  chain_s = time.perf_counter() - t0

  corpus = os.path.join(workdir, "data", "traces")
  train = [
    r
    for r in datasets.trace_records_from_corpus("array_record", corpus)
    if _fits(tok, r, max_prompt, args.max_new)
  ]
  held = [r for r in held_out_records() if _fits(tok, r, max_prompt, args.max_new)]
  task_file = os.path.join(workdir, "rl_trace_tasks.jsonl")
  with open(task_file, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train)
  sft_ckpt = os.path.join(workdir, "sft", "checkpoints")
  rl = smoke.add_rl_stage(smoke.get_config("schedule=all"))
  rl.rl.update(
    task_files=task_file,
    group_size=4,
    max_new_tokens=args.max_new,
    warmup_steps=0,
    temperature=1.0,
    sandbox_timeout_s=5.0,
  )
  st = rl.schedule.stages.rl
  st.update(
    seq_len=args.seq_len,
    batch_size=16,
    steps=args.rl_steps,
    start_from=sft_ckpt,
    global_window=1024,
    mesh=dict(data=-1, fsdp=1),
    optimizer=dict(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0),
  )
  rl_cfg = model_config(stages.stage_config(rl, len(smoke.STAGES), workdir))
  before = greedy_reward(rl_cfg, sft_ckpt, held, tok, args.max_new)
  t1 = time.perf_counter()
  results = schedule.run(rl, workdir)
  rl_s = time.perf_counter() - t1
  records = results["rl"]["records"] if isinstance(results.get("rl"), dict) else []
  after = greedy_reward(rl_cfg, os.path.join(workdir, "rl", "checkpoints"), held, tok, args.max_new)
  print(
    json.dumps(
      {
        "benchmark": "rl_chain",
        "workdir": workdir,
        "chain_s": round(chain_s, 1),
        "rl_s": round(rl_s, 1),
        "rl_steps": args.rl_steps,
        "train_tasks": len(train),
        "held_out_before_rl": before,
        "held_out_after_rl": after,
        "sampled_reward_first5": float(np.mean([r["reward_mean"] for r in records[:5]] or [0])),
        "sampled_reward_last5": float(np.mean([r["reward_mean"] for r in records[-5:]] or [0])),
        "updates_skipped": int(sum(r.get("skipped", 0) for r in records)),
        "rollout_tokens_per_sec": float(
          np.mean(
            [r["rollout_tokens_per_sec"] for r in records if "rollout_tokens_per_sec" in r] or [0]
          )
        ),
      }
    )
  )


if __name__ == "__main__":
  main()
