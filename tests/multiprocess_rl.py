"""One process of a multi-process RL check (run by tests/test_rl_multiprocess.py).

  JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \\
  XLA_FLAGS=--xla_force_host_platform_device_count=D python tests/multiprocess_rl.py MODE OUT

MODE `rl`: the toy GRPO run (`configs/rl_digits.py:steps=3`, rows over every device) with
workdir OUT (process 0 writes OUT/metrics.jsonl). MODE `mixed`: 2 RL steps on a task
file whose even records (process 0's shard of 2) are math tasks and odd ones tool
tasks, so the processes hold different numbers of single- and multi-turn tasks
(`mixed_disagg`: the same with disaggregated rollouts).
MODE `disagg`: the toy run of MODE `rl` with disaggregated rollouts, half of every
process's devices sampling (`rl.rollout_devices`) and rollouts of the policy being
updated (staleness 0). MODE `turns`: two sampling turns of
8 rows (each process its share) on a tiny model sharded over every device, environment
tokens appended between turns; writes this process's rows to OUT.<process id>.json.
MODE `tools`: multi-turn episodes of 4 shipped tool tasks, every process holding every row
(as disaggregated rollouts do), a scripted policy calling python twice per row before it
answers; the tool calls are shared over the processes (`trainer._SharedTools`); writes the
episodes' tokens, the rewards and the calls this process ran to OUT.<process id>.json.
"""

import json
import os
import sys

import jax

from cwm_jax.parallel.mesh import initialize_distributed

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
)
import rl_digits  # noqa: E402


def _turns(out: str) -> None:
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from cwm_jax.infer.sampler import Turns
  from cwm_jax.model import init_model, tiny
  from cwm_jax.parallel.mesh import make_mesh
  from cwm_jax.parallel.sharding import DEFAULT_RULES, named, param_specs

  jax.config.update("jax_default_matmul_precision", "highest")
  cfg = tiny(vocab_size=64, n_heads=4, n_kv_heads=2, local_window=6)
  model = init_model(cfg, seed=1)
  mesh = make_mesh({"data": jax.device_count() // 2, "tensor": 2})
  graphdef, state = nnx.split(model)
  params = jax.device_put(
    nnx.to_pure_dict(nnx.state(model, nnx.Param)), named(mesh, param_specs(cfg, DEFAULT_RULES))
  )
  nnx.replace_by_pure_dict(state, params)
  sharded = nnx.merge(graphdef, state)
  n, index = 8 // jax.process_count(), jax.process_index()
  rng = np.random.RandomState(0)
  contexts = [rng.randint(3, 64, 2 + i).tolist() for i in range(8)][index * n : (index + 1) * n]
  turns = Turns(
    sharded,
    n,
    48,
    temperature=1.0,
    stop_ids=[5],
    seed=2,
    pad_multiple=4,
    row_sharding=NamedSharding(mesh, P("data")),
  )
  results = []
  for turn in range(2):
    got = turns(contexts, 6)
    results.append({"tokens": got.tokens, "logprobs": got.logprobs})
    contexts = [
      c + t + [7 + turn] * (1 + (index * n + i) % 3)  # by global row
      for i, (c, t) in enumerate(zip(contexts, got.tokens))
    ]
  with open(f"{out}.{index}.json", "w") as f:
    json.dump(results, f)


def _tools(out: str) -> None:
  from cwm_jax.data.tokenizer import Tokenizer
  from cwm_jax.infer.sampler import GenerateResult
  from cwm_jax.parallel.mesh import make_mesh
  from cwm_jax.rl import datasets, episodes, rollout, trainer

  tok = Tokenizer.default()
  stream = datasets.TaskStream(trainer.task_paths("tool_compute"), tok, max_prompt_len=4096, seed=0)
  tasks = stream.take(4)
  eom, eot = tok.special_id("<|eom_id|>"), tok.special_id("<|eot_id|>")

  def turns(contexts, n, active):  # each row's calls print what only that row computes
    out = []
    for ctx, live in zip(contexts, active):
      calls = ctx.count(eom)
      if not live:
        out.append([])
      elif calls < 2:
        out.append(tok.encode(f"```python\nprint({len(ctx)} * {calls + 3})\n```") + [eom])
      else:
        out.append(tok.encode("Answer: 0") + [eot])
    return GenerateResult(out, [[-0.5] * len(ids) for ids in out])

  class Counted(episodes.ToolPool):
    ran = 0

    def __call__(self, calls):
      Counted.ran += sum(c is not None for c in calls)
      return super().__call__(calls)

  pool = Counted(workers=2)
  mesh = make_mesh({"data": jax.device_count()})
  shared = trainer._SharedTools(pool, mesh)  # pylint: disable=protected-access
  scorer = rollout.Scorer(1)
  eps, texts, rewards = episodes.run_episodes(
    turns, tasks, tok, scorer=scorer, any_process=shared.any_process, run_tools=shared
  )
  scorer.close()
  pool.close()
  result = {
    "tokens": [e.tokens for e in eps],
    "rewards": [r.value for r in rewards],
    "texts": texts,
    "ran": Counted.ran,
  }
  with open(f"{out}.{jax.process_index()}.json", "w") as f:
    json.dump(result, f)


def _mixed_config(out: str):
  import os

  from cwm_jax.data.tokenizer import Tokenizer
  from cwm_jax.rl import trainer

  with open(os.path.join(trainer.TASK_SETS, "tool_compute.jsonl")) as f:
    tools = [line.strip() for line in f if line.strip()][:8]
  records = []
  for i, tool in enumerate(tools):
    records += [
      json.dumps({"id": f"m{i}", "kind": "math", "prompt": f"{i} + 1?", "answer": str(i + 1)}),
      tool,
    ]
  path = f"{out}.{jax.process_index()}.jsonl"  # the same file for every process
  with open(path, "w") as f:
    f.write("\n".join(records) + "\n")
  c = rl_digits.get_config("steps=2")
  c.model.overrides.update(
    vocab_size=Tokenizer.default().vocab_size, global_window=256, local_window=32
  )
  c.seq_len, c.batch_size = 256, 8  # 4 prompts x 2 samples: 2 prompts per process
  c.rl.update(
    dict(
      tasks="toy",
      task_files=path,
      group_size=2,
      max_new_tokens=8,
      max_turns=2,
      sandbox_timeout_s=10.0,
    )
  )
  return c


def main(mode: str, out: str) -> None:
  initialize_distributed()
  if mode in ("turns", "tools"):
    (_turns if mode == "turns" else _tools)(out)
    return
  from cwm_jax.rl import trainer

  mixed = mode.startswith("mixed")
  config = _mixed_config(out) if mixed else rl_digits.get_config("steps=3")
  if mode in ("disagg", "mixed_disagg"):
    config.rl.rollout_devices = jax.device_count() // 2
  result = trainer.run(config, out)
  assert result["step"] == config.total_steps, result


if __name__ == "__main__":
  main(*sys.argv[1:])
