"""Training stages as first-class objects: a schedule config -> validated stage configs.

A schedule config is an ordinary training config (the defaults every stage
inherits) plus `schedule.order` ('pretrain,midtrain,sft'), `schedule.only`
(run just these stages; '' = all) and one `schedule.stages.NAME` section per
stage holding the `Stage` fields. `stage_config` turns a stage into the plain
training config that its trainer (`cwm_jax.recipe.trainers`) runs in `WORKDIR/NAME/`.

Steps are absolute. A stage with `carry_optimizer` restores the previous
stage's full state (params, optimizer, step) and continues its LR schedule:
every stage of such a chain trains on one schedule whose decay ends at the
chain's last step, each stage running its own segment of it. Any other stage
restores params only and starts a fresh optimizer at step 0. Restores are
made onto the new stage's mesh, so moving between stages reshards.
`cwm_jax.recipe.schedule` runs them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from cwm_jax import storage
from cwm_jax.base import ConfigError, check_fields
from cwm_jax.checkpoint.manager import complete_steps
from cwm_jax.recipe import trainers
from cwm_jax.train.config import model_config

SCRATCH, PREVIOUS = "scratch", "previous"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a training recipe; empty/zero fields keep the base config's value."""

  name: str
  seq_len: int
  batch_size: int
  steps: int = 0  # optimizer steps; 0 derives them from `tokens`
  tokens: float = 0.0  # token budget: steps = ceil(tokens / (batch_size * seq_len))
  global_window: int = 0  # window of the global layers (0: the model's)
  rope_scaling: bool = True  # llama3 RoPE scaling on (the preset's) or off (plain theta)
  mesh: dict = dataclasses.field(default_factory=dict)
  optimizer: dict = dataclasses.field(default_factory=dict)  # LR schedule (first stage of a chain)
  data: dict = dataclasses.field(default_factory=dict)  # data mixture / format
  loss: dict = dataclasses.field(default_factory=dict)
  rl: dict = dataclasses.field(default_factory=dict)  # the `rl` section's fields (RL stages)
  remat: str = ""  # remat policy ('' keeps the model's)
  execution: dict = dataclasses.field(default_factory=dict)  # other `execution` fields
  grad_accum: int = 0  # micro-batches per step (0 keeps the base config's)
  start_from: str = PREVIOUS  # 'scratch', 'previous' or a checkpoint directory
  carry_optimizer: bool = False  # keep optimizer state, step and LR schedule of the previous stage
  trainer: str = "lm"  # 'lm': cwm_jax.train; 'rl': the RL trainer

  def __post_init__(self):
    errors = []
    if self.seq_len < 1 or self.batch_size < 1:
      errors.append("seq_len and batch_size must be >= 1")
    if self.steps < 1 and self.tokens <= 0:
      errors.append("give steps >= 1 or a token budget tokens > 0")
    if self.trainer not in trainers.TRAINERS:
      errors.append(f"trainer={self.trainer!r} must be one of {sorted(trainers.TRAINERS)}")
    if self.carry_optimizer and self.start_from != PREVIOUS:
      errors.append("carry_optimizer needs start_from='previous'")
    if self.carry_optimizer and self.optimizer:
      errors.append(
        "a stage that carries the optimizer continues the previous stage's LR "
        f"schedule; move optimizer settings {sorted(self.optimizer)} to the chain's "
        "first stage"
      )
    if errors:
      raise ConfigError(f"schedule.stages.{self.name}: " + "; ".join(errors))

  @property
  def num_steps(self) -> int:
    if self.steps >= 1:
      return self.steps
    return math.ceil(self.tokens / (self.batch_size * self.seq_len))


def _plain(x) -> Any:
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


def stages_from_config(config) -> list[Stage]:
  """The ordered `Stage`s of a schedule config."""
  order = [s.strip() for s in config.schedule.order.split(",") if s.strip()]
  defined = set(config.schedule.stages.keys())
  missing = [s for s in order if s not in defined]
  if not order or missing:
    raise ConfigError(
      f"schedule.order={config.schedule.order!r} names stages {missing} without a "
      f"schedule.stages section (defined: {sorted(defined)})"
    )
  fields = {f.name for f in dataclasses.fields(Stage)} - {"name"}
  out = []
  for name in order:
    section = {k: _plain(v) for k, v in config.schedule.stages[name].items()}
    check_fields(section, fields, f"schedule.stages.{name}")
    out.append(Stage(name=name, **section))
  if out[0].start_from == PREVIOUS:
    raise ConfigError(
      f"first stage {out[0].name!r} has no previous stage; set its start_from "
      "to 'scratch' or a checkpoint directory"
    )
  return out


def selected(config, stages: list[Stage]) -> list[Stage]:
  only = [s.strip() for s in config.schedule.get("only", "").split(",") if s.strip()]
  check_fields(only, (s.name for s in stages), "schedule.only", "stages")
  return [s for s in stages if not only or s.name in only]


def step_range(stages: list[Stage], i: int) -> tuple[int, int, int]:
  """(first step, last step, end of the LR schedule) of stage i."""
  start = 0
  for j in range(i + 1):
    start = start if stages[j].carry_optimizer else 0
    end = start + stages[j].num_steps
    if j < i:
      start = end
  chain_end = end
  for later in stages[i + 1 :]:
    if not later.carry_optimizer:
      break
    chain_end += later.num_steps
  return start, end, chain_end


def _chain_head(stages: list[Stage], i: int) -> Stage:
  while stages[i].carry_optimizer:
    i -= 1
  return stages[i]


def stage_config(config, i: int, workdir: str) -> ml_collections.ConfigDict:
  """The plain training config of stage i, to be run in `workdir/NAME`."""
  stages = stages_from_config(config)
  st = stages[i]
  c = ml_collections.ConfigDict(config.to_dict())
  del c["schedule"]
  base_model = model_config(config)
  start, end, chain_end = step_range(stages, i)
  c.total_steps, c.seq_len, c.batch_size = end, st.seq_len, st.batch_size
  for section, values in (
    ("mesh", st.mesh),
    ("optimizer", _chain_head(stages, i).optimizer),
    ("data", st.data),
    ("loss", st.loss),
    ("rl", st.rl),
  ):
    if values:
      c[section].update(values)
  if not c.optimizer.get("decay_steps"):
    c.optimizer.decay_steps = chain_end
  gw = st.global_window or base_model.global_window
  windows = [gw if w >= base_model.global_window else min(w, gw) for w in base_model.layer_windows]
  c.model.overrides.update(
    dict(
      global_window=gw,
      layer_windows=windows,
      max_seq_len=max(gw, st.seq_len),
      rope_scaling=(
        dataclasses.asdict(base_model.rope_scaling)
        if st.rope_scaling and base_model.rope_scaling
        else None
      ),
    )
  )
  if st.remat:
    c.execution.remat_policy = st.remat
  for key, value in st.execution.items():  # unknown fields fail in `execution_config`
    with c.execution.unlocked():
      c.execution[key] = value
  if st.grad_accum:
    c.grad_accum = st.grad_accum
  c.init_from = ml_collections.ConfigDict(dict(path="", params_only=True, step=-1))
  if st.start_from == PREVIOUS:
    prev = stages[i - 1]
    c.init_from.path = storage.join(workdir, prev.name, "checkpoints")
    c.init_from.step = step_range(stages, i - 1)[1]
    c.init_from.params_only = not st.carry_optimizer
  elif st.start_from != SCRATCH:
    c.init_from.path = st.start_from
  c.stage = ml_collections.ConfigDict(dict(name=st.name, index=i, first_step=start))
  return c


def stage_configs(config, workdir: str = "/plan") -> list[tuple[str, ml_collections.ConfigDict]]:
  """[(name, plain training config)] of the selected stages, each with its trainer in
  `stage.trainer`; a config without a schedule is [('train', config)]. Not validated."""
  if "schedule" not in config:
    return [("train", config)]
  stages = stages_from_config(config)
  out = []
  for st in selected(config, stages):
    sc = stage_config(config, stages.index(st), workdir)
    sc.stage.trainer = st.trainer
    out.append((st.name, sc))
  return out


def latest_step(directory: str) -> int | None:
  """Latest committed checkpoint step under `directory` (None if none): a step directory
  whose save never committed (a killed save, an empty `70/`) does not count."""
  steps = complete_steps(directory)
  return steps[-1] if steps else None


def plan_stages(config, workdir: str) -> list[tuple[Stage, ml_collections.ConfigDict]]:
  """Every selected stage with its training config, all validated before any runs."""
  stages = stages_from_config(config)
  out = []
  for st in selected(config, stages):
    sc = stage_config(config, stages.index(st), workdir)
    try:
      trainers.TRAINERS[st.trainer].validate(sc)
    except ConfigError as e:
      raise ConfigError(f"stage {st.name}: {e}") from e
    out.append((st, sc))
  return out
