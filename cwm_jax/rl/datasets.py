"""RL task datasets from files, read through grain: per-process shards, shuffled, resumable.

A task file is JSONL (or ArrayRecord) with one task record per line; files, folders and globs
may be local or object-store URLs (`gs://...`, read through `cwm_jax.data.sources`):

  {"id": STR, "kind": "code" | "math" | "trace" | "output" | "agentic",
   "prompt": STR  or  "messages": [{"role": R, "content": STR}, ...],
   ...the kind's verifier fields..., "reference": STR (optional, for a supervised warmup)}

  code     "tests": Python asserts run against the completion's code in the sandbox
  math     "answer": the exact final answer (`rewards.exact_answer_reward`)
  trace    "source", "function", "args" (list), "kwargs" (dict), optional "frames": the
           interpreter's frames (traced in the sandbox when absent); the prompt is the
           trace prompt plus the call frame, the reward checks the final event and value
  output   "code" (defines `f`) and "input" (the call's argument text): predict the value of
           `f(INPUT)`, judged by `assert f(INPUT) == PREDICTION` in the sandbox's harness
           (`rl.output_tasks`, which also generates such records); the prompt is built here
  agentic  "answer" and "tools" (["python"] and/or ["bash"]): a multi-turn episode in
           which the policy may run code in the sandbox (`cwm_jax.rl.episodes`)

A record that fails to parse or validate is a bad task: counted by reason
(`TaskStream.bad`) and skipped, never an exception in the trainer.
`trace_records_from_corpus` turns any traced corpus (records of format 'trace',
see `cwm_jax.data.formats`) into trace task records.
"""

from __future__ import annotations

import collections
import functools
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain

from cwm_jax.base import ConfigError
from cwm_jax.data import formats, sources
from cwm_jax.data.traces import format as trace_format
from cwm_jax.data.traces.sandbox import Limits
from cwm_jax.infer import rewards
from cwm_jax.infer.trace_predict import TraceError, prompt_text, real_trace
from cwm_jax.rl import tasks as tasks_lib
from cwm_jax.rl.tasks import Task

RECORD_KINDS = ("code", "math", "trace", "output", "agentic")
TOOLS = ("python", "bash")


class BadTask(ValueError):
  """A task record that cannot become a Task; `reason` names the kind of problem."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def _text(record: dict, key: str) -> str:
  value = record.get(key)
  if not isinstance(value, str) or not value.strip():
    raise BadTask(f"missing_{key}", f"task {record.get('id')!r} needs a non-empty string {key!r}")
  return value


def _prompt_ids(record: dict, tokenizer) -> tuple[int, ...]:
  if "messages" in record:
    messages = record["messages"]
    if (
      not isinstance(messages, list)
      or not messages
      or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
      )
    ):
      raise BadTask("bad_messages", "messages must be a non-empty list of {role, content}")
    try:
      return tuple(tokenizer.encode_dialog([(m["role"], m["content"]) for m in messages]))
    except ValueError as e:  # an unknown role
      raise BadTask("bad_messages", str(e)) from e
  return tuple(tokenizer.encode_dialog([("user", _text(record, "prompt"))]))


def _reference(record: dict, tokenizer) -> tuple[int, ...]:
  text = record.get("reference")
  if not isinstance(text, str):
    return ()
  return (*tokenizer.encode(text), tokenizer.special_id("<|eot_id|>"))


def _trace_task(record: dict, tokenizer, limits: Limits) -> Task:
  source, function = _text(record, "source"), _text(record, "function")
  args, kwargs = record.get("args", []), record.get("kwargs", {})
  if not isinstance(args, list) or not isinstance(kwargs, dict):
    raise BadTask("bad_inputs", "args must be a list and kwargs an object")
  frames = record.get("frames")
  try:
    if frames is None:
      frames = real_trace(source, function, args, kwargs, limits=limits)
    if (
      not isinstance(frames, list)
      or len(frames) < 2
      or not all(isinstance(f, dict) and "event" in f for f in frames)
    ):
      raise BadTask("bad_frames", "frames must be a list of at least a call and a last event")
    prompt = prompt_text(source, function, frames[0])
  except (TraceError, ValueError, SyntaxError) as e:
    if isinstance(e, BadTask):
      raise
    raise BadTask("untraceable", str(e)[:200]) from e
  reference = tuple(tokenizer.encode_trace(trace_format.format_frames(frames[1:])))
  return Task(
    str(record["id"]),
    "trace",
    tuple(tokenizer.encode_trace(prompt)),
    functools.partial(rewards.trace_reward, real_last_frame=frames[-1]),
    reference,
  )


def _output_task(record: dict, tokenizer, limits: Limits) -> Task:
  code, arg = _text(record, "code"), _text(record, "input")
  try:
    compile(code, "<task>", "exec", dont_inherit=True)  # builds a code object, runs nothing
    rewards.check_tests(f"assert f({arg}) == None")  # the call is judged outside the program
  except (SyntaxError, ValueError) as e:
    raise BadTask("bad_code", str(e)[:200]) from None
  return tasks_lib.output_task(record, tokenizer, limits)


def task_from_record(record: Any, tokenizer, limits: Limits = rewards.DEFAULT_LIMITS) -> Task:
  """The Task of one record (a dict, or JSON bytes/str); BadTask if it is not one."""
  try:
    record = formats.parse_record(record)
  except formats.BadRecord as e:
    raise BadTask(e.reason, str(e)) from e
  if not isinstance(record.get("id"), (str, int)):
    raise BadTask("missing_id", "every task needs an 'id'")
  kind = record.get("kind")
  if kind not in RECORD_KINDS:
    raise BadTask("unknown_kind", f"kind={kind!r}; choose one of {RECORD_KINDS}")
  if kind == "trace":
    return _trace_task(record, tokenizer, limits)
  if kind == "output":
    return _output_task(record, tokenizer, limits)
  prompt, name = _prompt_ids(record, tokenizer), str(record["id"])
  if kind == "code":
    tests = _text(record, "tests")
    try:
      rewards.check_tests(tests)  # judged outside the program, or never scored
    except ValueError as e:
      raise BadTask("bad_tests", str(e)) from None
    verify = functools.partial(rewards.code_reward, tests=tests, limits=limits)
    return Task(name, kind, prompt, verify, _reference(record, tokenizer))
  verify = functools.partial(rewards.exact_answer_reward, answer=_text(record, "answer"))
  tools = record.get("tools", ["python"]) if kind == "agentic" else []
  if not isinstance(tools, list) or not set(tools) <= set(TOOLS):
    raise BadTask("bad_tools", f"tools={tools!r}; choose from {TOOLS}")
  return Task(name, kind, prompt, verify, _reference(record, tokenizer), tuple(tools))


class TaskStream:
  """An endless, shuffled, checkpointable stream of Tasks from task files.

  `get_state()` / `set_state(state)` round-trip the position and the bad-task
  counts exactly (the runtime checkpoints the stream with the train state); each
  process reads its own shard. Thread-safe: async rollouts draw tasks while the
  main thread saves.
  """

  def __init__(
    self,
    paths: Sequence[str],
    tokenizer,
    *,
    max_prompt_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    limits: Limits = rewards.DEFAULT_LIMITS,
  ):
    records = _records(paths)
    if len(records) < process_count:
      raise ConfigError(
        f"rl.task_files hold {len(records)} records, fewer than the {process_count} processes"
      )
    self.bad: collections.Counter = collections.Counter()
    self._tokenizer, self._limits, self._max_len = tokenizer, limits, max_prompt_len
    shard = grain.MapDataset.source(records)[process_index::process_count]
    # Parsed in the taking thread: grain's reader threads would run `ast.parse` (trace
    # tasks) concurrently, which this stack's CPython 3.11.7 can fail with "AST constructor
    # recursion depth mismatch" (a SystemError that also breaks later parses in the process;
    # seen once in a clean-clone CI run of the stream test).
    self._it = iter(
      shard.shuffle(seed=seed)
      .repeat()
      .map(self._parse)
      .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    )
    self._size = len(shard)
    self._lock = threading.Lock()

  def _parse(self, raw) -> Task | str:
    try:
      task = task_from_record(raw, self._tokenizer, self._limits)
    except BadTask as e:
      return e.reason
    if len(task.prompt_ids) > self._max_len:
      return "too_long"
    return task

  def take(self, n: int) -> list[Task]:
    """The next `n` good tasks (bad ones are counted and skipped)."""
    with self._lock:
      return self._take(n)

  def _take(self, n: int) -> list[Task]:
    out, misses = [], 0
    while len(out) < n:
      item = next(self._it)
      if isinstance(item, Task):
        out.append(item)
        misses = 0
        continue
      self.bad[item] += 1
      misses += 1
      if misses > self._size:
        raise ConfigError(
          f"no usable task in rl.task_files (bad: {dict(self.bad)}); fix the "
          "records or raise seq_len"
        )
    return out

  def get_state(self) -> dict:
    with self._lock:
      return {"iterator": self._it.get_state(), "bad": dict(self.bad)}

  def set_state(self, state: dict) -> None:
    with self._lock:
      self._it.set_state(state["iterator"])
      self.bad = collections.Counter(state["bad"])


def _records(paths: Sequence[str]) -> list:
  out = []
  for path in paths:
    array_record = path.endswith(".array_record") or ("*" in path and not path.endswith(".jsonl"))
    kind = "array_record" if array_record else "jsonl"
    source = sources.make_source(kind, path)
    out += [source[i] for i in range(len(source))]
  if not out:
    raise ConfigError(f"rl.task_files={list(paths)} hold no records")
  return out


_FUNCTION = re.compile(
  r"^\s*(?:async\s+)?def\s+(\w+)\s*\(.*" + re.escape(trace_format.START_MARKER), re.M
)


def trace_task_record(document: str, record_id: str) -> dict:
  """A trace task record from one trace document (`{"format": "trace", "text": ...}`)."""
  head, sep, frames_text = document.partition(trace_format.FRAME_SEP)
  if not sep or trace_format.CONTEXT not in head:
    raise BadTask("not_a_trace", "no trace prompt in the document")
  marked = head.split(trace_format.CONTEXT, 1)[1]
  match = _FUNCTION.search(marked)
  frames = trace_format.parse_frames(frames_text)
  if match is None or len(frames) < 2:
    raise BadTask("not_a_trace", "no marked entry function or fewer than two frames")
  locals_ = trace_format.resolve_locals(frames)
  frames = [dict(f, locals=l) if l is not None else f for f, l in zip(frames, locals_)]
  return {
    "id": record_id,
    "kind": "trace",
    "function": match.group(1),
    "source": marked.replace(trace_format.START_MARKER, ""),
    "frames": frames,
  }


def trace_records_from_corpus(kind: str, path: str) -> Iterator[dict]:
  """Trace task records of every trace document of a corpus (`kind` as in
  `cwm_jax.data.sources.make_source`); documents that are not traces are skipped."""
  source = sources.make_source(kind, path)
  for i in range(len(source)):
    try:
      record = formats.parse_record(source[i])
      if record.get("format") == "trace":
        yield trace_task_record(record["text"], f"{path}#{i}")
    except (formats.BadRecord, BadTask):
      continue
