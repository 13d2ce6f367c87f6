"""RL: GRPO numbers by hand, verifiers against the interpreter, batches, async staleness,
and a toy verifiable task whose reward rises under the RL loop."""

import json
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rl_digits

from cwm_jax.base import ConfigError
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.data.traces import PROGRAMS_DIR, format_frames
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer import rewards
from cwm_jax.infer.sampler import GenerateResult
from cwm_jax.infer.trace_predict import real_trace
from cwm_jax.rl import grpo, rollout, tasks, trainer

# Runaway loops stop at 2 s of CPU time; the wall-clock limit is generous so that a busy
# machine (slow interpreter starts) cannot turn a passing or memory-bound run into a timeout.
FAST = Limits(timeout_s=60.0, cpu_s=2.0, memory_mb=256, output_bytes=10_000)


def test_group_advantages_by_hand():
  adv = grpo.group_advantages([[1, -1, -1, 1], [1, 1, 1, -1], [-1, -1, -1, -1]])
  np.testing.assert_allclose(adv, [[1, -1, -1, 1], [0.5, 0.5, 0.5, -1.5], [0, 0, 0, 0]])
  assert grpo.groups_kept(adv).tolist() == [True, True, False]


def test_grpo_loss_by_hand():
  # Row 0: A=+1, ratios 1.5 (clipped to 1.25, blocked), 0.9; third token masked.
  # Row 1: A=-0.5, ratios 0.7 (clipped to 0.8, blocked), 1.1, 1.3 (not blocked for A<0).
  # Row 2: a skipped group (mask 0). Token losses -1.25 -0.9 +0.4 +0.55 +0.65 = -0.55,
  # divided by N=2 sequences times the fixed max_len=4 (not the lengths 2 and 3).
  ratios = jnp.array([[1.5, 0.9, 2.0], [0.7, 1.1, 1.3], [3.0, 0.1, 1.0]])
  old = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1], [-1.0, -1.0, -1.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], jnp.float32)
  adv = jnp.array([1.0, -0.5, 0.0])
  loss_fn = jax.jit(lambda logp: grpo.grpo_loss(logp, old, adv, mask, max_len=4))
  logp = old + jnp.log(ratios)
  loss, m = loss_fn(logp)
  np.testing.assert_allclose(loss, -0.55 / 8, rtol=1e-6)
  np.testing.assert_allclose(m["clip_fraction"], 2 / 5, rtol=1e-6)
  np.testing.assert_allclose(m["ratio_mean"], 5.5 / 5, rtol=1e-6)
  assert float(m["loss_sequences"]) == 2
  # d loss / d logp = -r*A/8 where the unclipped term is taken, 0 where blocked or masked.
  grad = jax.jit(jax.grad(lambda x: loss_fn(x)[0]))(logp)
  np.testing.assert_allclose(
    grad, [[0, -0.9 / 8, 0], [0, 0.55 / 8, 0.65 / 8], [0, 0, 0]], atol=1e-7
  )


def _group(task, turns_list, values):
  eps = [rollout.episode(turns) for turns in turns_list]
  rs = [rewards.Reward(v, v > 0, "pass" if v > 0 else "wrong") for v in values]
  return rollout.Group(task, eps, [""] * len(eps), rs, [1] * len(eps), version=0)


def test_batch_masks_prompt_and_environment_tokens():
  task = tasks.digit_tasks(n=1)[0]
  multi_turn = [([1, 2, 3], None), ([4, 5], [-0.1, -0.2]), ([6, 7], None), ([8], [-0.3])]
  single = [([1, 2], None), ([9], [-0.5])]
  batch, stats = rollout.make_batch(
    [_group(task, [multi_turn, single], [1.0, -1.0]), _group(task, [single, single], [-1.0, -1.0])],
    seq_len=8,
  )
  np.testing.assert_array_equal(batch["inputs"][0], [1, 2, 3, 4, 5, 6, 7, 0])
  np.testing.assert_array_equal(batch["targets"][0], [2, 3, 4, 5, 6, 7, 8, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0, 1, 0])
  np.testing.assert_allclose(batch["old_logp"][0], [0, 0, -0.1, -0.2, 0, 0, -0.3, 0])
  np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][1], [0, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(batch["advantages"], [1, -1, 0, 0])
  assert not batch["loss_mask"][2:].any()  # the all-zero-advantage group is skipped
  assert stats["groups_kept"] == 0.5 and stats["reward_mean"] == -0.5
  assert stats["pass_rate"] == 0.25


def test_code_verifier_in_sandbox():
  tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
  good = "```python\ndef add(a, b):\n    return a + b\n```"
  assert rewards.code_reward(good, tests, FAST) == rewards.Reward(1.0, True, "pass")
  assert rewards.code_reward("def add(a, b):\n    return a - b", tests, FAST).value == -1
  assert rewards.code_reward("def add(a, b) return", tests, FAST).status == "syntax"
  import_os = "import os\ndef add(a, b):\n    os.exit(3)"  # AttributeError: a failing run
  assert rewards.code_reward(import_os, tests, FAST).value == -1


def test_runaway_programs_get_minus_one_and_rollouts_continue():
  tok = Tokenizer.default()
  task = next(t for t in tasks.code_tasks(tok, FAST) if t.name == "code/add")
  programs = [
    "def add(a, b):\n    while True:\n        pass\n",
    "def add(a, b):\n    x = []\n    while True:\n        x.append(' ' * 10**7)\n",
    "def add(a, b):\n    return a + b\n",
    "def add(a, b):\n    return a * b\n",
  ]
  eot = tok.special_id("<|eot_id|>")

  def fake_generate(model, prompts, **kw):
    ids = [tok.encode(p) + [eot] for p in programs]
    return GenerateResult(ids, [[-0.5] * len(x) for x in ids])

  scorer = rollout.Scorer(workers=2)
  groups = rollout.collect(
    None,
    [task],
    group_size=4,
    max_new_tokens=64,
    temperature=1.0,
    top_p=1.0,
    stop_ids=tok.stop_ids,
    decode=tok.decode,
    scorer=scorer,
    seed=0,
    version=0,
    generate_fn=fake_generate,
  )
  scorer.close()
  assert [r.status for r in groups[0].rewards] == ["timeout", "memory", "pass", "error"]
  assert [r.value for r in groups[0].rewards] == [-1, -1, 1, -1]
  batch, stats = rollout.make_batch(groups, seq_len=128)
  loss, _ = jax.jit(grpo.grpo_loss, static_argnames="max_len")(
    batch["old_logp"], batch["old_logp"], batch["advantages"], batch["loss_mask"], max_len=64
  )
  assert stats["pass_rate"] == 0.25 and np.isfinite(float(loss))


def test_exact_answer_verifier():
  for good in ("42", "The answer is 42.", "Answer: 42", "\\boxed{84/2}", "42.0"):
    assert rewards.exact_answer_reward(good, "42").passed, good
  for bad in ("41", "", "42 or 43", "\\boxed{4}"):
    assert rewards.exact_answer_reward(bad, "42").value == -1, bad


def test_trace_verifier_against_the_interpreter():
  with open(os.path.join(PROGRAMS_DIR, "fizzbuzz.py")) as f:
    source = f.read()
  frames = real_trace(source, "running_max", ([3, 1, 4],))
  assert frames[-1]["event"] == "return" and json.loads(frames[-1]["value"]) == [3, 3, 4]
  exact = format_frames(frames[1:])
  assert rewards.trace_reward(exact, frames[-1]).passed
  # Only the outcome matters: skipping the line frames still earns the reward.
  assert rewards.trace_reward(format_frames(frames[-1:]), frames[-1]).passed
  wrong = dict(frames[-1], value=json.dumps([3, 1, 4]))
  assert rewards.trace_reward(format_frames(frames[1:-1] + [wrong]), frames[-1]).value == -1
  assert rewards.trace_reward(format_frames(frames[1:], end=False), frames[-1]).value == -1


def test_trace_tasks_from_shipped_programs():
  tok = Tokenizer.default()
  found = tasks.trace_tasks(tok, max_prompt_len=300, limit=2)
  assert len(found) == 2 and all(len(t.prompt_ids) <= 300 for t in found)
  ref = found[0]
  assert ref.verify(tok.decode(ref.reference_ids)).passed  # the interpreter's own trace
  assert not ref.verify(tok.decode(ref.reference_ids[:5])).passed


def test_async_rollouts_drop_stale_batches():
  def produce(params, version):
    time.sleep(0.01)
    return (params, version)

  feed = rollout.AsyncRollouts(produce, max_staleness=1)
  try:
    feed.publish("p0", 0)
    assert feed.get(0)[0] == 0
    feed.publish("p3", 3)  # a batch sampled at version 0 is still queued: it must be dropped
    sampled_at, (params, version) = feed.get(3)
    assert sampled_at >= 2 and params == "p3" and feed.dropped >= 1
  finally:
    feed.close()
  assert not any(t.name == "rl-rollouts" and t.is_alive() for t in threading.enumerate())


def test_toy_task_reward_rises(tmp_path):
  """From random init, 'output the digit in the prompt' (1/16 by chance) is learned by RL."""
  out = trainer.run(rl_digits.get_config("steps=30"), str(tmp_path))
  rewards_ = [r["reward_mean"] for r in out["records"]]
  before, after = np.mean(rewards_[:5]), np.mean(rewards_[-5:])
  assert before < -0.5 and after > before + 0.6, (before, after, rewards_)
  # The sampler's log-probs (old policy, KV-cache path) equal the update's recomputed ones.
  ratios = [r["ratio_mean"] for r in out["records"] if not r["skipped"]]
  np.testing.assert_allclose(ratios, 1.0, atol=1e-4)
  with open(tmp_path / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  assert last["step"] == 30
  for key in ("reward_mean", "pass_rate", "clip_fraction", "response_length", "loss"):
    assert key in last
  assert os.path.isdir(tmp_path / "checkpoints" / "30")


def test_bad_rl_configs():
  c = rl_digits.get_config("steps=2")
  c.rl.group_size = 3  # 128 rollouts do not split into groups of 3
  with pytest.raises(ConfigError, match="group_size"):
    trainer.validate(c)
  c = rl_digits.get_config("steps=2")
  c.rl.temperature = 0.0
  with pytest.raises(ConfigError, match="temperature"):
    trainer.validate(c)
  c = rl_digits.get_config(
    "steps=2"
  )  # 16 prompts of 8 samples: whole groups on each of 2 processes
  trainer.validate(c, n_processes=2)
  with pytest.raises(ConfigError, match="do not split over 32 processes"):
    trainer.validate(c, n_processes=32)
  c.rl.async_rollouts = True
  with pytest.raises(ConfigError, match="async_rollouts=True runs on one process"):
    trainer.validate(c, n_processes=2)
  with pytest.raises(ConfigError, match="unknown kinds"):
    tasks.task_set("code,poetry", max_prompt_len=64)
  with pytest.raises(ConfigError, match="cannot be mixed"):
    tasks.task_set("digits,code", max_prompt_len=64)


def test_smoke_rl_stage_config():
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import smoke  # pylint: disable=import-outside-toplevel

  from cwm_jax.recipe import stages  # pylint: disable=import-outside-toplevel

  c = smoke.get_config("stage=rl")
  plan = stages.plan_stages(c, "/nonexistent")
  assert [st.name for st, _ in plan] == ["rl"] and plan[0][0].trainer == "rl"
  trainer.validate(plan[0][1])


def test_accumulated_grpo_update_equals_the_whole_batch():
  """grad_accum micro-batches add up to the whole batch's loss, metrics and update (the
  loss divisors are the whole batch's)."""
  import optax
  from flax import nnx

  from cwm_jax.model import init_model, tiny

  cfg = tiny(vocab_size=32)
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, seed=0), nnx.Param))
  tx = optax.sgd(0.1)
  rng = np.random.default_rng(0)
  b, t = 4, 8
  mask = (rng.random((b, t)) < 0.6).astype(np.float32)
  mask[3] = 0  # a skipped row: not among the loss's sequences
  batch = {
    "inputs": rng.integers(1, 32, (b, t)).astype(np.int32),
    "targets": rng.integers(1, 32, (b, t)).astype(np.int32),
    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    "segment_ids": np.ones((b, t), np.int32),
    "loss_mask": mask,
    "old_logp": rng.normal(-3.5, 0.3, (b, t)).astype(np.float32),
    "advantages": np.array([1.0, -0.5, 0.25, 0.0], np.float32),
  }
  out = {}
  for k in (1, 2):
    step = jax.jit(grpo.make_rl_step(cfg, tx, lambda s: 0.1, max_len=t, grad_accum=k))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": 0}
    out[k] = step(state, batch)
  (s1, m1), (s2, m2) = out[1], out[2]
  assert float(m1["loss_sequences"]) == 3 == float(m2["loss_sequences"])
  for key in ("loss", "grad_norm", "clip_fraction", "ratio_mean", "approx_kl"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-7, err_msg=key)
  for a, c in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
