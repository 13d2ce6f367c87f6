"""RL over several processes (gloo on localhost): 2 processes x 4 devices give what one
process with 8 devices gives, for the whole GRPO loop and for multi-turn sampling."""

import json
import os

import localhost
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "multiprocess_rl.py")


def _run(mode: str, out: str, processes: int) -> None:
  localhost.run([DRIVER, mode, out], processes, 8 // processes, timeout=900)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process_rl(tmp_path_factory):
  """The toy GRPO run on one process with 8 devices, rollouts on the training mesh."""
  out = tmp_path_factory.mktemp("rl") / "one"
  _run("rl", str(out), 1)
  return _metrics(out)


def test_rl_loop_on_two_processes_matches_one(tmp_path, one_process_rl):
  """Each process samples its share of the groups on the global mesh and scores them; the
  global batch, the statistics and the updates equal the one-process run's."""
  _run("rl", str(tmp_path / "two"), 2)
  want, got = one_process_rl, _metrics(tmp_path / "two")
  assert [r["step"] for r in got] == [1, 2, 3]
  assert any(r["grad_norm"] > 0 for r in want)  # real updates, not skipped groups
  for key in ("reward_mean", "pass_rate", "groups_kept", "loss", "grad_norm"):
    np.testing.assert_allclose(
      [r[key] for r in got], [r[key] for r in want], rtol=1e-5, atol=1e-7, err_msg=key
    )


def test_disaggregated_rollouts_on_two_processes_equal_colocated(tmp_path, one_process_rl):
  """2 processes x 4 devices: 2 of each process's devices train, 2 sample from weights
  synced device to device; with staleness 0 the rewards and updates equal the colocated
  one-process run's."""
  _run("disagg", str(tmp_path / "disagg"), 2)
  want, got = one_process_rl, _metrics(tmp_path / "disagg")
  assert [r["step"] for r in got] == [1, 2, 3]
  assert any(r["grad_norm"] > 0 for r in want)
  assert all(r["staleness"] == 0 and r["stale_dropped"] == 0 for r in got)
  for key in ("reward_mean", "pass_rate", "groups_kept", "loss", "grad_norm"):
    np.testing.assert_allclose(
      [r[key] for r in got], [r[key] for r in want], rtol=1e-5, atol=1e-5, err_msg=key
    )


def test_multi_turn_sampling_on_two_processes_matches_one(tmp_path):
  """`Turns` with each process's rows: prefill, then a block appended per row (of unequal
  lengths), over a mesh spanning both processes: the same tokens and log-probs."""
  _run("turns", str(tmp_path / "one"), 1)
  _run("turns", str(tmp_path / "two"), 2)
  want = json.load(open(tmp_path / "one.0.json"))
  parts = [json.load(open(tmp_path / f"two.{i}.json")) for i in range(2)]
  for turn in range(2):
    tokens = parts[0][turn]["tokens"] + parts[1][turn]["tokens"]
    assert tokens == want[turn]["tokens"]
    assert sum(map(len, tokens)) > 8  # rows sampled more than their first token
    np.testing.assert_allclose(
      np.concatenate(parts[0][turn]["logprobs"] + parts[1][turn]["logprobs"]),
      np.concatenate(want[turn]["logprobs"]),
      atol=1e-5,
    )


def test_tool_calls_of_rows_every_process_holds_run_once_and_reach_every_process(tmp_path):
  """Disaggregated tool episodes over 2 processes: each process runs half of a turn's tool
  calls, and both see every row's output, as one process running all of them does."""
  _run("tools", str(tmp_path / "one"), 1)
  _run("tools", str(tmp_path / "two"), 2)
  want = json.load(open(tmp_path / "one.0.json"))
  got = [json.load(open(tmp_path / f"two.{i}.json")) for i in range(2)]
  assert want["ran"] == 8  # 4 rows x 2 calls
  assert [g["ran"] for g in got] == [4, 4]
  for g in got:
    assert g["tokens"] == want["tokens"] and g["texts"] == want["texts"]
    assert g["rewards"] == want["rewards"]
  from cwm_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  tok = Tokenizer.default()
  for ids in want["tokens"]:  # two tool outputs (a number each) in every episode
    episode = tok.decode(ids)
    assert episode.count("tool: python<|end_header_id|>\n\n") == 2, episode


@pytest.mark.parametrize("mode", ["mixed", "mixed_disagg"])
def test_processes_with_different_task_kinds_sample_together(tmp_path, mode):
  """Process 0 holds only math tasks, process 1 only tool tasks: each pads its share of
  single- and multi-turn sampling to the other's count, so both run the same programs.
  Disaggregated, every process holds every row and the tool calls are shared."""
  _run(mode, str(tmp_path / mode), 2)
  records = _metrics(tmp_path / mode)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:  # statistics over both processes' groups
    assert {"reward_math", "reward_agentic"} <= set(r) and r["rollout_tokens_per_sec"] > 0
