"""Multi-turn episodes with tools: the policy runs Python or bash in the sandbox, then answers.

Chat format (CWM technical report): the policy writes an assistant message. To call a
tool it ends the message with `<|eom_id|>` after a fenced block ```python or
```bash; the block runs in the sandbox and its output comes back as an
environment message `<|start_header_id|>tool: NAME<|end_header_id|>\\n\\nOUTPUT<|eot_id|>`
followed by a fresh assistant header. Environment tokens carry loss weight 0
(`rollout.episode` turns with no log-probs); only sampled tokens are trained.
An episode ends when the policy ends a message with `<|eot_id|>` (its final
answer, which the task verifies), or at a limit: `max_turns` policy messages,
`max_tokens` in the whole episode (no message starts that could cross it; tool
output is cut to fit), or `max_seconds` of wall time; a cut-off
episode is scored on the text it produced (usually no answer: reward -1).

Episodes of a batch advance together: each turn samples the next message of
every unfinished episode in one call of a `sampler.Turns`, which keeps the KV
cache between turns and feeds each episode only what it lacks (its last
sampled token, the tool output, the next header), then runs their tool calls
in a thread pool (each in its own sandboxed child; `run_tools` replaces it). Over
several processes every process plays its own episodes (or, disaggregated, all of
them, sharing out the tool calls) and `any_process` makes the turn loop's stop
decisions collective, so all processes sample the same number of turns.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from cwm_jax.data.traces.sandbox import Limits, run_python
from cwm_jax.infer import rewards
from cwm_jax.rl.rollout import Episode, Group, episode
from cwm_jax.rl.tasks import Task

_CALL = re.compile(r"```(python|py|bash|sh)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TOOL_NAMES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash"}
TOOL_OUTPUT_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
  max_turns: int = 4  # policy messages per episode
  max_tokens: int = 1024  # tokens in the whole episode (prompt, messages, tool output)
  max_seconds: float = 60.0  # wall time per batch of episodes
  message_tokens: int = 256  # new tokens per policy message


def tool_call(message: str, allowed: Sequence[str]) -> tuple[str, str] | None:
  """(tool, code) of the last fenced python/bash block of a message, if the tool is allowed."""
  calls = _CALL.findall(message)
  if not calls:
    return None
  tool, code = _TOOL_NAMES[calls[-1][0]], calls[-1][1]
  return (tool, code) if tool in allowed else None


def run_tool(tool: str, code: str, limits: Limits = rewards.DEFAULT_LIMITS) -> str:
  """The tool's output as the environment shows it: stdout, then stderr, status if not ok."""
  source = (
    code
    if tool == "python"
    else (
      "import subprocess, sys\n"
      f"r = subprocess.run(['/bin/sh', '-c', {code!r}], capture_output=True, text=True)\n"
      "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); sys.exit(r.returncode)\n"
    )
  )
  result = run_python(source, limits=limits)
  text = result.stdout + (("\n" + result.stderr) if result.stderr.strip() else "")
  if result.status != "ok":
    text += f"\n[{result.status}]"
  return text[-TOOL_OUTPUT_CHARS:]


@dataclasses.dataclass
class _State:
  task: Task
  turns: list = dataclasses.field(default_factory=list)  # (ids, logprobs or None)
  text: str = ""  # the policy's messages, for the verifier
  tokens: int = 0
  messages: int = 0
  done: bool = False

  @property
  def context(self) -> list[int]:
    return [t for ids, _ in self.turns for t in ids]


def _local(flags: np.ndarray) -> np.ndarray:
  return flags


class ToolPool:
  """Runs a turn's tool calls in a pool of threads, each call in its own sandboxed child."""

  def __init__(self, limits: Limits = rewards.DEFAULT_LIMITS, workers: int = 2):
    self.limits = limits
    self.pool = concurrent.futures.ThreadPoolExecutor(max(workers, 1))

  def __call__(self, calls: Sequence[tuple[str, str] | None]) -> list[str]:
    """The output of each (tool, code) call; "" where there is no call."""
    futures = [self.pool.submit(run_tool, *c, self.limits) if c else None for c in calls]
    return [f.result() if f else "" for f in futures]

  def close(self) -> None:
    self.pool.shutdown()


def run_episodes(
  turns: Callable,
  tasks: Sequence[Task],
  tokenizer,
  *,
  scorer: Callable,
  limits: EpisodeLimits = EpisodeLimits(),
  tool_limits: Limits = rewards.DEFAULT_LIMITS,
  workers: int = 2,
  any_process: Callable[[np.ndarray], np.ndarray] = _local,
  run_tools: Callable[[list], list[str]] | None = None,
) -> tuple[list[Episode], list[str], list]:
  """Plays every task once; returns (episodes, final texts, rewards).

  `turns(contexts, max_new_tokens, active) -> GenerateResult` samples one message for
  each active row (a `sampler.Turns` over `len(tasks)` rows); `any_process` ORs boolean
  flags over processes; `run_tools(calls)` gives the output of each row's (tool, code)
  call, or "" for None (default: a `ToolPool` of `workers` threads with `tool_limits`).
  """
  if run_tools is None:
    tools = ToolPool(tool_limits, workers)
    try:
      return run_episodes(
        turns,
        tasks,
        tokenizer,
        scorer=scorer,
        limits=limits,
        any_process=any_process,
        run_tools=tools,
      )
    finally:
      tools.close()
  eom, eot = tokenizer.special_id("<|eom_id|>"), tokenizer.special_id("<|eot_id|>")
  states = [_State(t, [(list(t.prompt_ids), None)], tokens=len(t.prompt_ids)) for t in tasks]
  deadline = time.monotonic() + limits.max_seconds
  while True:
    for s in states:  # a message must fit: prompt + message <= max_tokens
      s.done = s.done or s.tokens + limits.message_tokens > limits.max_tokens
    mask = [not s.done for s in states]
    live, late = any_process(np.array([any(mask), time.monotonic() > deadline]))
    if not live or late:
      break
    result = turns([s.context for s in states], limits.message_tokens, mask)
    calls = [None] * len(states)
    for i, (s, ids, logps) in enumerate(zip(states, result.tokens, result.logprobs)):
      if s.done:
        continue
      s.turns.append((ids, logps))
      s.tokens += len(ids)
      s.messages += 1
      body = tokenizer.decode([t for t in ids if t not in (eom, eot)])
      s.text += body
      call = tool_call(body, s.task.tools) if ids and ids[-1] == eom else None
      if call is None or s.messages >= limits.max_turns:
        s.done = True
      else:
        calls[i] = call
    for s, call, text in zip(states, calls, run_tools(calls)):
      if call is None:
        continue
      head = tokenizer.header(f"tool: {call[0]}")
      tail = [eot] + tokenizer.header("assistant")
      room = limits.max_tokens - s.tokens - len(head) - len(tail) - limits.message_tokens
      output = tokenizer.encode(text)
      if room < 1:  # no room for the output and another message: the episode ends here
        s.done = True
        continue
      env = head + output[-room:] + tail  # the end of long output (errors come last)
      s.turns.append((env, None))
      s.tokens += len(env)
  texts = [s.text for s in states]
  return [episode(s.turns) for s in states], texts, scorer([s.task for s in states], texts)


def collect_groups(
  make_turns: Callable,
  tasks: Sequence[Task],
  tokenizer,
  *,
  group_size: int,
  scorer: Callable,
  version: int,
  limits: EpisodeLimits = EpisodeLimits(),
  tool_limits: Limits = rewards.DEFAULT_LIMITS,
  any_process: Callable[[np.ndarray], np.ndarray] = _local,
  run_tools: Callable[[list], list[str]] | None = None,
) -> list[Group]:
  """`group_size` episodes of each task, as rollout Groups; `make_turns(rows)` gives the
  `run_episodes` sampler for that many rows."""
  flat = [t for t in tasks for _ in range(group_size)]
  eps, texts, rws = run_episodes(
    make_turns(len(flat)),
    flat,
    tokenizer,
    scorer=scorer,
    limits=limits,
    tool_limits=tool_limits,
    any_process=any_process,
    run_tools=run_tools,
  )
  groups = []
  for i, task in enumerate(tasks):
    rows = range(i * group_size, (i + 1) * group_size)
    groups.append(
      Group(
        task,
        [eps[r] for r in rows],
        [texts[r] for r in rows],
        [rws[r] for r in rows],
        [sum(p for p in eps[r].policy) for r in rows],
        version,
      )
    )
  return groups
