"""Disaggregated RL on CPU: 2 processes x 4 devices, 2 of each process's devices training
and 2 sampling, against the colocated run on the same 8 devices; prints one JSON object.

  python benchmarks/rl_disagg.py [--steps 8] [--rounds 2] [--save]

Each round runs the colocated loop, then the disaggregated loop with rollouts one policy
version ahead (`rl.async_rollouts`, `rl.max_staleness=1`: sampled on the rollout devices
while the update runs), alternating so machine load falls on both alike. Per mode: rollout
tokens/s (tokens sampled over sampling time), updates/s (steps over the loop's wall time
after its first two steps: compiles), and the overlap. Colocated, each sampling waits for the
update that makes its params and each update for its batch: its wall time per update is
sampling + update in series. `overlap_ratio` is the disaggregated wall time per update over
that (below 1: sampling and updating overlapped), and `hidden_update` says whether the
disaggregated wall per update stays within its own sampling time (the update hidden behind
it). `update_done_s` (the trainer's `update_time`: dispatch to done as a watcher thread sees
it) is an upper bound: under host load the thread waits for the interpreter lock.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

DRIVER = r"""
import json, os, sys, time
from cwm_jax.parallel.mesh import initialize_distributed
initialize_distributed()
import jax
from cwm_jax.rl import trainer
import cwm_jax
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(cwm_jax.__file__)), "configs"))
import rl_digits
mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = rl_digits.get_config(f"steps={steps}")
# A model whose sampling and update dominate dispatch: 4 layers of width 256.
c.model.overrides.update(n_layers=4, dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=1024)
c.seq_len, c.batch_size = 24, 64
c.rl.update(group_size=8, max_new_tokens=16, temperature=1.0)
c.log_every = 1
if mode == "disagg":
  c.rl.update(rollout_devices=jax.device_count() // 2, async_rollouts=True, max_staleness=1)
times = []
trainer.run(c, out, hooks=[lambda ctx: times.append(time.perf_counter())])
if jax.process_index() == 0:
  with open(os.path.join(out, "times.json"), "w") as f:
    json.dump(times, f)
"""


def _run(mode: str, steps: int, out: str) -> None:
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import localhost  # pylint: disable=g-import-not-at-top

  try:
    localhost.run(["-c", DRIVER, mode, str(steps), out], processes=2, devices=4, timeout=3000)
  except RuntimeError as e:
    raise SystemExit(f"{mode} failed: {e}") from None


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, "times.json")) as f:
    times = json.load(f)  # after each step, by a hook
  # The first update compiles, and a record's update_time is the previous update's: the
  # timed window starts after the second step.
  timed = records[2:]
  wall = times[-1] - times[1]
  sampling = sum(r["rollout_time"] for r in timed)
  update = sum(r.get("update_time", 0.0) for r in timed)
  tokens = sum(r["rollout_tokens_per_sec"] * r["rollout_time"] for r in timed)
  return {
    "updates": len(timed),
    "updates_per_s": len(timed) / wall,
    "rollout_tokens_per_s": tokens / sampling,
    "wall_per_update_s": wall / len(timed),
    "sampling_per_update_s": sampling / len(timed),
    "update_done_s": update / len(timed),
    "staleness_max": max(r["staleness"] for r in records),
    "reward_mean_last": records[-1]["reward_mean"],
  }


def summarize(rounds: dict, steps: int, seconds: float) -> dict:
  """The result from each round's per-mode figures (`_summary`)."""

  def mean(mode, key):
    return sum(x[key] for x in rounds[mode]) / len(rounds[mode])

  keys = [k for k in rounds["colocated"][0] if k != "overlap_ratio"]
  wall = {m: mean(m, "wall_per_update_s") for m in rounds}
  return {
    "setup": "2 processes x 4 CPU devices; disaggregated: 4 train (2 per process), 4 sample",
    "steps": steps,
    "rounds": len(rounds["colocated"]),
    "cpu_count": os.cpu_count(),
    **{m: {k: round(mean(m, k), 4) for k in keys} for m in rounds},
    "overlap_ratio": round(wall["disagg"] / wall["colocated"], 4),
    "hidden_update": wall["disagg"] <= 1.05 * mean("disagg", "sampling_per_update_s"),
    "updates_per_s_ratio": round(
      mean("disagg", "updates_per_s") / mean("colocated", "updates_per_s"), 4
    ),
    "per_round": rounds,
    "seconds": seconds,
  }


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--save", action="store_true")
  ap.add_argument(
    "--from_json", default="", help="summarize the per_round figures of an earlier run's JSON"
  )
  args = ap.parse_args()
  t0 = time.perf_counter()
  if args.from_json:
    with open(args.from_json) as f:
      earlier = json.load(f)
    earlier = earlier.get("result", earlier)
    for mode_rounds in earlier["per_round"].values():  # the figure's earlier name
      for r in mode_rounds:
        r.pop("overlap_ratio", None)
        if "update_per_update_s" in r:
          r["update_done_s"] = r.pop("update_per_update_s")
    result = summarize(earlier["per_round"], earlier["steps"], earlier["seconds"])
    result["summarized_from"] = os.path.basename(args.from_json)
  else:
    rounds: dict[str, list] = {"colocated": [], "disagg": []}
    with tempfile.TemporaryDirectory() as tmp:
      for r in range(args.rounds):
        for mode in ("colocated", "disagg"):
          out = os.path.join(tmp, f"{mode}{r}")
          _run(mode, args.steps, out)
          rounds[mode].append(_summary(out))
    result = summarize(rounds, args.steps, round(time.perf_counter() - t0, 1))
  print(json.dumps(result))
  if args.save:
    import results_io

    results_io.save("rl_disagg", result)


if __name__ == "__main__":
  main()
