"""RL at scale: task files through grain, multi-turn tool episodes, RL on the training runtime
(SIGTERM save and exact resume, async rollouts), sampled log-probs == the trainer's."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rl_digits

from cwm_jax.base import ConfigError
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.infer.rewards import Reward, exact_answer_reward
from cwm_jax.infer.sampler import GenerateResult
from cwm_jax.model import init_model, tiny
from cwm_jax.model.logprobs import token_logprobs
from cwm_jax.rl import datasets, episodes, rollout, trainer
from cwm_jax.rl.tasks import Task

TOK = Tokenizer.default()
SUM_SOURCE = "def f(n):\n  s = 0\n  for i in range(n):\n    s += i\n  return s\n"
GOOD = [
  {"id": "m1", "kind": "math", "prompt": "What is 2 + 2?", "answer": "4", "reference": "4"},
  {
    "id": "c1",
    "kind": "code",
    "messages": [{"role": "user", "content": "Write add(a, b)."}],
    "tests": "assert add(1, 2) == 3",
  },
  {"id": "t1", "kind": "trace", "source": SUM_SOURCE, "function": "f", "args": [3]},
  {"id": "a1", "kind": "agentic", "prompt": "What is 3**5?", "answer": "243", "tools": ["python"]},
]
BAD = [
  '{"id": "x", "kind": "math", "prompt": "q"',
  '{"id": "x", "kind": "poem", "prompt": "q"}',
  '{"id": "x", "kind": "math", "prompt": "q"}',
  '{"kind": "math", "prompt": "q", "answer": 1}',
  '{"id": "x", "kind": "agentic", "prompt": "q", "answer": "1", "tools": ["curl"]}',
  '{"id": "x", "kind": "trace", "source": "def f(:", "function": "f"}',
]


def _write(path, lines):
  with open(path, "w") as f:
    f.writelines(line + "\n" for line in lines)
  return str(path)


def test_every_kind_parses_and_verifies_like_the_interpreter():
  tasks = {r["id"]: datasets.task_from_record(r, TOK) for r in GOOD}
  assert tasks["m1"].verify("Answer: 4").passed and not tasks["m1"].verify("Answer: 5").passed
  code = "```python\ndef add(a, b):\n    return a + b\n```"
  assert (
    tasks["c1"].verify(code).passed and not tasks["c1"].verify("def add(a, b): return 0").passed
  )
  # The reference completion of a trace task is the interpreter's own trace: f(3) returns 3.
  assert tasks["t1"].verify(TOK.decode(tasks["t1"].reference_ids)).passed
  assert tasks["a1"].tools == ("python",) and tasks["a1"].verify("Answer: 243").passed


def test_bad_tasks_are_counted_and_skipped_and_the_stream_resumes_exactly(tmp_path):
  path = _write(tmp_path / "tasks.jsonl", [json.dumps(r) for r in GOOD] + BAD)
  stream = datasets.TaskStream([path], TOK, max_prompt_len=4096, seed=3)
  first = [t.name for t in stream.take(6)]
  assert set(first) <= {r["id"] for r in GOOD} and len(first) == 6
  state = json.loads(json.dumps(stream.get_state()))  # what the checkpoint stores
  assert sum(state["bad"].values()) >= len(BAD) - 1  # a pass over the shuffled file saw them
  after = [t.name for t in stream.take(9)]
  bad_after = dict(stream.bad)
  again = datasets.TaskStream([path], TOK, max_prompt_len=4096, seed=3)
  again.set_state(state)
  assert [t.name for t in again.take(9)] == after and dict(again.bad) == bad_after


def test_processes_read_disjoint_shards(tmp_path):
  lines = [
    json.dumps({"id": f"m{i}", "kind": "math", "prompt": f"{i}+0?", "answer": str(i)})
    for i in range(10)
  ]
  path = _write(tmp_path / "tasks.jsonl", lines)
  names = [
    {
      t.name
      for t in datasets.TaskStream(
        [path], TOK, max_prompt_len=4096, seed=0, process_index=p, process_count=2
      ).take(5)
    }
    for p in (0, 1)
  ]
  assert not names[0] & names[1] and len(names[0] | names[1]) == 10


def test_trace_tasks_from_a_traced_corpus(tmp_path):
  from cwm_jax.data import formats
  from cwm_jax.data.traces import format as trace_format
  from cwm_jax.infer.trace_predict import real_trace

  frames = real_trace(SUM_SOURCE, "f", (4,))
  doc = formats.trace_document(
    trace_format.format_prompt(SUM_SOURCE, "f"), trace_format.format_frames(frames)
  )
  path = _write(
    tmp_path / "corpus.jsonl",
    [json.dumps({"format": "trace", "text": doc}), json.dumps({"format": "text", "text": "x = 1"})],
  )
  records = list(datasets.trace_records_from_corpus("jsonl", path))
  assert len(records) == 1 and records[0]["function"] == "f"
  task = datasets.task_from_record(records[0], TOK)
  assert task.verify(trace_format.format_frames(frames[1:])).passed
  wrong = [dict(f, value="7") if f["event"] == "return" else f for f in frames[1:]]
  assert not task.verify(trace_format.format_frames(wrong)).passed


def _scripted(calls_before_answer: int, answer: str = "243"):
  """A fake policy: `calls_before_answer` python tool calls, then an answer."""
  eom, eot = TOK.special_id("<|eom_id|>"), TOK.special_id("<|eot_id|>")

  def generate(prompts, n, active):
    out = []
    for p, live in zip(prompts, active):
      if not live:
        out.append([])
      elif p.count(eom) < calls_before_answer:
        out.append(TOK.encode("```python\nprint(3 ** 5)\n```") + [eom])
      else:
        out.append(TOK.encode(f"Answer: {answer}") + [eot])
    return GenerateResult(out, [[-0.25] * len(ids) for ids in out])

  return generate


def test_tool_episode_runs_the_sandbox_and_masks_environment_tokens():
  task = datasets.task_from_record(GOOD[3], TOK)
  scorer = rollout.Scorer(1)
  eps, texts, rewards = episodes.run_episodes(_scripted(1), [task], TOK, scorer=scorer)
  ep = eps[0]
  text = TOK.decode(ep.tokens)
  assert "<|start_header_id|>tool: python<|end_header_id|>\n\n243\n" in text
  assert rewards[0].passed and texts[0].endswith("Answer: 243")
  tool_start = text.index("tool: python")
  # Environment (tool) tokens and the prompt carry no loss; sampled tokens do.
  policy_text = TOK.decode([t for t, p in zip(ep.tokens, ep.policy) if p])
  assert "243\n" not in policy_text.split("Answer")[0] and "print(3 ** 5)" in policy_text
  assert tool_start > 0 and not any(ep.policy[: len(task.prompt_ids)])
  # A policy that never answers stops at max_turns and earns -1.
  eps, _, rewards = episodes.run_episodes(
    _scripted(99), [task], TOK, scorer=scorer, limits=episodes.EpisodeLimits(max_turns=3)
  )
  assert TOK.decode(eps[0].tokens).count("tool: python") == 2 and rewards[0].value == -1
  scorer.close()


def test_shipped_tool_set_needs_the_tool():
  stream = datasets.TaskStream(trainer.task_paths("tool_compute"), TOK, max_prompt_len=4096, seed=0)
  tasks = stream.take(24)
  assert not stream.bad and all(t.tools == ("python",) for t in tasks)
  # The answers are what Python computes, not something to guess.
  t = next(t for t in tasks if "3**200" in TOK.decode(t.prompt_ids))
  assert t.verify(f"Answer: {sum(map(int, str(3**200)))}").passed


def test_sampled_logprobs_equal_the_trainers():
  cfg = tiny(vocab_size=64)
  model = init_model(cfg, seed=0)
  tasks = [
    Task(f"t{i}", "math", tuple(range(1 + i, 6 + 2 * i)), lambda c: exact_answer_reward(c, "1"))
    for i in range(3)
  ]
  groups = rollout.collect(
    model,
    tasks,
    group_size=2,
    max_new_tokens=6,
    temperature=1.0,
    top_p=1.0,
    stop_ids=(),
    decode=lambda ids: "",
    seed=0,
    version=0,
    scorer=lambda ts, cs: [
      Reward((-1.0) ** i, i % 2 == 0, "") for i in range(len(cs))
    ],  # every group kept
    pad_multiple=8,
  )
  batch, _ = rollout.make_batch(groups, seq_len=24)
  logits = model(
    jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])
  )
  logp = np.asarray(token_logprobs(logits, jnp.asarray(batch["targets"])))
  mask = batch["loss_mask"] > 0
  assert mask.sum() == 3 * 2 * 6  # every sampled token is a policy token
  np.testing.assert_allclose(logp[mask], batch["old_logp"][mask], atol=1e-5)


def _rl_config(tmp_path, steps, **rl):
  c = rl_digits.get_config(f"steps={steps}")
  c.model.overrides.update(vocab_size=TOK.vocab_size, global_window=256, local_window=32)
  c.seq_len, c.batch_size = 96, 8  # 4 prompts x 2 samples, rows over 8 devices
  c.checkpoint_every, c.log_every = 1, 1
  c.rl.update(
    dict(tasks="toy", task_files="", group_size=2, max_new_tokens=8, sandbox_timeout_s=10.0), **rl
  )
  return c


def _records(path):
  return [json.loads(line) for line in open(path)]


def _task_file_config(tmp_path):
  """Supervised steps on a task file's references: the loss depends on which tasks the
  stream gave, so equal losses after a resume mean the stream position was restored."""
  path = _write(
    tmp_path / "tasks.jsonl",
    [
      json.dumps(
        {
          "id": f"m{i}",
          "kind": "math",
          "prompt": f"{i} + 1?",
          "answer": str(i + 1),
          "reference": f"{i + 1} is the sum",
        }
      )
      for i in range(8)
    ]
    + BAD[:2],
  )
  return _rl_config(tmp_path, 4, task_files=path, warmup_steps=4)


def _digits_config(tmp_path):
  """The from-scratch toy task: every step is a real GRPO update (rewards vary)."""
  c = rl_digits.get_config("steps=4")
  c.checkpoint_every = 1
  return c


@pytest.mark.parametrize("make_config", [_task_file_config, _digits_config])
def test_rl_sigterm_save_and_exact_resume(tmp_path, make_config):
  c = make_config(tmp_path)
  straight = trainer.run(c, str(tmp_path / "a"))
  assert straight["step"] == 4
  want = _records(tmp_path / "a" / "metrics.jsonl")

  def sigterm_at_2(ctx):
    if ctx.step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  first = trainer.run(c, str(tmp_path / "b"), hooks=[sigterm_at_2])
  assert first["preempted"] and first["step"] == 3  # the flag is read after the next step
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["1", "2", "3"]
  second = trainer.run(c, str(tmp_path / "b"))
  assert second["step"] == 4 and not second["preempted"]
  got = _records(tmp_path / "b" / "metrics.jsonl")
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  assert any(r.get("skipped", 0.0) == 0.0 and r["grad_norm"] > 0 for r in want[1:])
  for key in ("loss", "reward_mean", "grad_norm"):
    np.testing.assert_allclose(
      [r.get(key, 0.0) for r in got],
      [r.get(key, 0.0) for r in want],
      rtol=1e-6,
      atol=1e-7,
      err_msg=key,
    )


def test_async_rollouts_with_tools_run_end_to_end(tmp_path):
  c = _rl_config(
    tmp_path,
    3,
    task_files="tool_compute",
    async_rollouts=True,
    max_staleness=1,
    max_turns=2,
    max_new_tokens=8,
    episode_seconds=60.0,
  )
  c.seq_len = 256  # the shipped prompts are ~60 tokens; room for two turns and tool output
  out = trainer.run(c, str(tmp_path))
  assert out["step"] == 3
  records = _records(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(r["staleness"] <= 1 and r["rollout_tokens_per_sec"] > 0 for r in records)
  assert all(r["reward_agentic"] == -1.0 for r in records)  # a random policy never answers


def test_cwm_32b_rl_stage_validates_with_the_trainers_schema():
  from cwm_jax.recipe import grids, stages

  config = grids.parse_config("configs/cwm_32b.py:stage=rl")
  sc = stages.stage_config(config, 3, "/runs")  # pretrain, midtrain, sft, rl
  # The slice's 256 chips on its 64 hosts: half train, half decode in 4-chip replicas.
  trainer.validate(sc, n_devices=256, n_processes=64)  # every field is one the RL trainer reads
  assert sc.seq_len == 131072 and sc.rl.loss_max_len == 131072 and sc.rl.group_size == 8
  assert sc.batch_size * sc.seq_len == 128 * 131072 and sc.rl.max_staleness == 8
  assert sc.rl.rollout_devices == 128 and sc.grad_accum == 8
  bad = ml_collections.ConfigDict(sc.to_dict())  # 64 chips train, 192 decode in 8-chip replicas
  bad.rl.rollout_devices, bad.rl.rollout_tensor, bad.mesh.fsdp = 192, 8, 8
  with pytest.raises(ConfigError, match="do not divide over the 24 rollout replicas"):
    trainer.validate(bad, n_devices=256, n_processes=64)
  colocated = ml_collections.ConfigDict(sc.to_dict())
  colocated.rl.rollout_devices = 0
  colocated.mesh.update(fsdp=32)
  colocated.grad_accum = 4
  with pytest.raises(ConfigError, match="do not split over 64 processes"):
    trainer.validate(colocated, n_devices=256, n_processes=64)
  devices = 256
  sc.rl.kl_coef = 0.1  # a field CWM's recipe names but no code reads
  with pytest.raises(ConfigError, match=r"unknown rl fields \['kl_coef'\]"):
    trainer.validate(sc, n_devices=devices)


def test_rollouts_on_the_training_mesh_match_one_device():
  """Params sharded as in training, rows over the data axes: the same tokens and log-probs."""
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from cwm_jax.infer.sampler import generate
  from cwm_jax.parallel.mesh import make_mesh
  from cwm_jax.parallel.sharding import DEFAULT_RULES, named, param_specs

  cfg = tiny(vocab_size=64, n_heads=4, n_kv_heads=2)
  model = init_model(cfg, seed=1)
  prompts = [list(range(1 + i, 4 + i + i % 3)) for i in range(8)]
  kw = dict(max_new_tokens=5, temperature=1.0, seed=3, pad_multiple=8)
  want = generate(model, prompts, **kw)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(model)
  params = jax.device_put(
    nnx.to_pure_dict(nnx.state(model, nnx.Param)), named(mesh, param_specs(cfg, DEFAULT_RULES))
  )
  nnx.replace_by_pure_dict(state, params)
  sharded = nnx.merge(graphdef, state)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  got = generate(sharded, prompts, row_sharding=rows, **kw)
  assert got.tokens == want.tokens
  np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(want.logprobs), atol=1e-5)
  assert not sharded.layers.attention.wq[...].sharding.is_fully_replicated


def test_a_trace_completion_keeps_its_end_marker_for_the_verifier():
  task = datasets.task_from_record(GOOD[2], TOK)
  ids = list(task.reference_ids)
  assert ids[-1] in TOK.stop_ids  # <|end_of_text|> stops sampling ...
  text = rollout.completion_text(TOK.decode, ids, TOK.stop_ids)
  assert task.verify(text).passed  # ... and still reaches the verifier
  chat = TOK.encode("Answer: 4") + [TOK.special_id("<|eot_id|>")]
  assert rollout.completion_text(TOK.decode, chat, TOK.stop_ids) == "Answer: 4"


def test_code_tasks_whose_tests_cannot_be_judged_outside_the_program_are_bad_at_load():
  """A test form the caller cannot evaluate on values read back from the sandbox (here a
  try block) would be decided inside the program's process: the task is refused."""
  record = {
    "id": "c9",
    "kind": "code",
    "prompt": "Write add.",
    "tests": "try:\n  assert add(1, 2) == 3\nexcept Exception:\n  pass\n",
  }
  with pytest.raises(datasets.BadTask) as e:
    datasets.task_from_record(record, TOK)
  assert e.value.reason == "bad_tests"
  ok = dict(record, tests="assert add(1, 2) == 3")
  assert datasets.task_from_record(ok, TOK).verify("def add(a, b):\n  return a + b").passed
