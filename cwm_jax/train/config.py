"""Run-config helpers: the base training config, variant parsing, validation.

A training config is an `ml_collections.ConfigDict`. Every training config has
`total_steps`, `checkpoint_every`, `log_every`, `seed` and
`mesh.{data,fsdp,tensor,sequence}` at the top level. `validate` runs before
anything is compiled and raises `ConfigError` naming every bad field.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from flax import nnx

from cwm_jax.base import ConfigError
from cwm_jax.model.config import ModelConfig, preset
from cwm_jax.model.execution import Execution
from cwm_jax.model.transformer import abstract_model
from cwm_jax.parallel import mesh as mesh_lib
from cwm_jax.parallel import sharding
from cwm_jax.train.optimizer import SCHEDULES


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all training configs (tiny model, synthetic data)."""
  c = ml_collections.ConfigDict()
  c.total_steps = 20  # absolute step at which training stops
  c.checkpoint_every = 10  # 0: only at the end (and on SIGTERM)
  c.log_every = 1
  c.seed = 0
  c.batch_size = 8  # global sequences per optimizer step
  c.seq_len = 64
  c.grad_accum = 1  # micro-batches per step (batch_size / grad_accum each)
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
  c.rules = [list(r) for r in sharding.DEFAULT_RULES]
  # The architecture: a preset plus ModelConfig field overrides.
  c.model = ml_collections.ConfigDict(dict(preset="tiny", overrides={}))
  # How it runs (cwm_jax.model.execution.Execution fields); never stored in checkpoints.
  c.execution = ml_collections.ConfigDict(dataclasses.asdict(Execution()))
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=3e-3,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
      schedule="cosine",
      warmup_steps=2,
      decay_steps=0,
      min_lr_ratio=0.1,
      decay_fraction=0.2,
      # 0: a non-finite loss or gradient norm stops the run (exit 3, last good checkpoint
      # kept); N > 0: such steps are skipped (no update), stopping after N in a row.
      skip_nonfinite=0,
    )
  )
  c.loss = ml_collections.ConfigDict(dict(z_loss=0.0, chunk=0))
  c.data = ml_collections.ConfigDict(dict(source="synthetic", mean_doc_len=24, prompt_fraction=0.0))
  # on_corrupt: a checkpoint that fails to restore on resume is reported and the previous
  # complete one is used ('fallback'), or the run stops with exit 2 ('fail').
  c.checkpoint = ml_collections.ConfigDict(
    dict(max_to_keep=3, async_save=True, on_corrupt="fallback")
  )
  c.init_from = ml_collections.ConfigDict(dict(path="", params_only=True, step=-1))
  # Trackers: metrics.jsonl always, TensorBoard, wandb when `wandb_project` is set
  # ('online', or 'offline' to sync later). On a bucket workdir the metrics are rewritten
  # every `flush_every_s` seconds and before every checkpoint.
  c.metrics = ml_collections.ConfigDict(
    dict(
      peak_flops=0.0, tensorboard=True, wandb_project="", wandb_mode="online", flush_every_s=60.0
    )
  )
  # A jax.profiler trace of `num_steps` steps from `start_step` (-1: none) into
  # WORKDIR/profile/; also on request while running (WORKDIR/profile.request, SIGUSR1).
  c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))
  # In-training evaluation (a hook of cwm_jax.recipe.trainers): every `eval_every` steps
  # (0 = off), logged to metrics.jsonl as `eval/*` records; `eval` holds EvalConfig fields.
  c.eval_every = 0
  c.eval = ml_collections.ConfigDict(
    dict(
      max_programs=4,
      max_new_tokens=256,
      max_tokens=512,
      batch_size=4,
      generate=True,
      perplexity=True,
    )
  )
  # The standard code benchmarks in-loop (docs/evaluation.md; a hook of
  # cwm_jax.recipe.trainers, fields of cwm_jax.infer.benchmarks.SuiteConfig): every
  # `suites.every` steps (0 = off) each suite given a local (or gs://) data file in its
  # published format is sampled with the current params and scored in the sandbox; logged as
  # `eval/SUITE/*`, per-sample results in WORKDIR/suites/SUITE/step_N.jsonl.
  c.suites = ml_collections.ConfigDict(
    dict(
      every=0,
      humaneval="",
      mbpp="",
      cruxeval_o="",
      cruxeval_i="",
      livecodebench="",
      n=1,  # completions per task
      k="1",  # pass@k for these k ('1,10'), each <= n
      max_new_tokens=256,
      temperature=0.0,  # 0: greedy (n must then be 1)
      limit=0,  # the first N tasks of each file (0: all)
      batch_size=8,  # rows per sampling call
      workers=2,  # sandboxed runs at a time on each process
    )
  )
  # Hugging Face exports during training (a hook of cwm_jax.recipe.trainers): every
  # `export.every` steps (0 = off; a multiple of checkpoint_every) that step's checkpoint is
  # converted, in a background thread, into WORKDIR/hf/step_N.
  c.export = ml_collections.ConfigDict(dict(every=0))
  # XLA options for the init and step jits; an entry of -1 means XLA's default
  # (level 0 compiles the tiny test models much faster on CPU).
  c.compiler_options = ml_collections.ConfigDict(dict(xla_backend_optimization_level=-1))
  return c


def parse_variant(arg: str | None) -> dict[str, str]:
  """'key=value,key2=value2' -> dict; '' or None -> {}."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or not key:
      raise ConfigError(f"config argument {part!r} must look like key=value")
    out[key.strip()] = value.strip()
  return out


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig named by `config.model.preset` plus `config.model.overrides`."""
  overrides = dict(
    config.model.overrides.to_dict()
    if hasattr(config.model.overrides, "to_dict")
    else config.model.overrides
  )
  try:
    return preset(config.model.preset, **overrides)
  except TypeError as e:
    raise ConfigError(
      f"model.overrides: {e}; use ModelConfig field names (execution "
      "choices such as attention_impl go in the `execution` section)"
    ) from e


def execution_config(config: ml_collections.ConfigDict) -> Execution:
  """The `Execution` of `config.execution` (defaults where the section is absent)."""
  section = config.get("execution")
  return Execution.from_mapping(section.to_dict() if section is not None else {})


def validate(config, model_cfg: ModelConfig, n_devices: int, n_processes: int) -> dict:
  """Checks the run config against the devices; returns the resolved mesh sizes."""
  errors = check_values(config)
  try:
    execution_config(config)
  except ConfigError as e:
    errors.append(str(e))
  for name in ("total_steps", "log_every", "batch_size", "seq_len", "grad_accum"):
    if config[name] < 1:
      errors.append(f"{name}={config[name]} must be >= 1")
  if config.checkpoint_every < 0:
    errors.append(f"checkpoint_every={config.checkpoint_every} must be >= 0")
  if config.optimizer.schedule not in SCHEDULES:
    errors.append(f"optimizer.schedule={config.optimizer.schedule!r} must be one of {SCHEDULES}")
  try:
    shape = mesh_lib.mesh_shape(dict(config.mesh), n_devices)
  except mesh_lib.MeshError as e:
    raise ConfigError(f"{e} ({n_devices} devices)") from e
  sizes = dict(zip(mesh_lib.MESH_AXES, shape))
  tp = sizes["tensor"]
  for field in ("n_heads", "n_kv_heads"):
    if getattr(model_cfg, field) % tp:
      errors.append(
        f"model {field}={getattr(model_cfg, field)} is not divisible by "
        f"mesh.tensor={tp}; pick a tensor size dividing it"
      )
  axes = _batch_mesh_axes(config.rules)
  batch_axes = mesh_lib.axis_size(sizes, axes)
  axes_desc = "*".join(f"mesh.{a}" for a in axes) + f"={batch_axes}"
  micro = f"batch_size={config.batch_size}" + (
    f" / grad_accum={config.grad_accum}" if config.grad_accum > 1 else ""
  )
  if config.grad_accum >= 1 and config.batch_size % config.grad_accum:
    errors.append(
      f"batch_size={config.batch_size} is not divisible by grad_accum={config.grad_accum}"
    )
  elif config.grad_accum >= 1 and (config.batch_size // config.grad_accum) % batch_axes:
    errors.append(
      f"{micro} is not divisible by the batch axes {axes_desc}; change batch_size or the mesh"
    )
  if config.batch_size % n_processes:
    errors.append(f"batch_size={config.batch_size} is not divisible by the {n_processes} processes")
  if config.seq_len % sizes["sequence"]:
    errors.append(f"seq_len={config.seq_len} is not divisible by mesh.sequence={sizes['sequence']}")
  if config.seq_len > model_cfg.max_seq_len:
    errors.append(
      f"seq_len={config.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}"
    )
  if config.loss.chunk and config.seq_len % config.loss.chunk:
    errors.append(f"seq_len={config.seq_len} is not divisible by loss.chunk={config.loss.chunk}")
  if config.get("eval_every", 0) < 0:
    errors.append(f"eval_every={config.eval_every} must be >= 0 (0 turns evaluation off)")
  errors += _export_errors(config)
  if not errors:
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(model_cfg), nnx.Param))
    errors += sharding.indivisible(shapes, sharding.param_specs(model_cfg, config.rules), sizes)
  if errors:
    raise ConfigError("invalid training config: " + "; ".join(errors))
  return sizes


def _export_errors(config) -> list[str]:
  """`export.every`: 0 (off) or a positive multiple of `checkpoint_every`, since an export
  converts the checkpoint of its step."""
  every = _get(config, "export.every")
  if every is None or every == 0:
    return []
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    return [f"export.every={every!r} must be an integer >= 0 (0 turns exports off)"]
  if config.checkpoint_every <= 0:
    return [
      f"export.every={every} needs checkpoints every N steps: set checkpoint_every to "
      f"{every} or a divisor of it (it is {config.checkpoint_every})"
    ]
  if every % config.checkpoint_every:
    return [
      f"export.every={every} must be a multiple of checkpoint_every="
      f"{config.checkpoint_every} (an export converts that step's checkpoint); use "
      f"export.every={-(-every // config.checkpoint_every) * config.checkpoint_every}"
    ]
  return []


# (dotted field, lowest, highest, lowest included, highest included); None: unbounded.
_RANGES = (
  ("optimizer.lr", 0, None, True, True),
  ("optimizer.b1", 0, 1, True, False),
  ("optimizer.b2", 0, 1, True, False),
  ("optimizer.eps", 0, None, False, True),
  ("optimizer.weight_decay", 0, None, True, True),
  ("optimizer.clip_norm", 0, None, True, True),
  ("optimizer.warmup_steps", 0, None, True, True),
  ("optimizer.decay_steps", 0, None, True, True),
  ("optimizer.min_lr_ratio", 0, 1, True, True),
  ("optimizer.decay_fraction", 0, 1, True, True),
  ("optimizer.skip_nonfinite", 0, None, True, True),
  ("loss.z_loss", 0, None, True, True),
  ("loss.chunk", 0, None, True, True),
  ("seed", 0, None, True, True),
  ("data.prompt_fraction", 0, 1, True, True),
  ("data.mean_doc_len", 1, None, True, True),
  ("checkpoint.max_to_keep", 1, None, True, True),
  ("init_from.step", -1, None, True, True),
  ("metrics.peak_flops", 0, None, True, True),
  ("metrics.flush_every_s", 0, None, False, True),
  ("profile.start_step", -1, None, True, True),
  ("profile.num_steps", 1, None, True, True),
)
_CHOICES = (
  ("checkpoint.on_corrupt", ("fallback", "fail")),
  ("metrics.wandb_mode", ("online", "offline")),
)


def _leaves(node, prefix=""):
  items = node.items() if hasattr(node, "items") else ()
  for k, v in items:
    name = f"{prefix}{k}"
    if hasattr(v, "items"):
      yield from _leaves(v, name + ".")
    else:
      yield name, v


def _get(config, dotted: str):
  node = config
  for key in dotted.split("."):
    if not hasattr(node, "get") or key not in node:
      return None
    node = node[key]
  return node


def check_values(config) -> list[str]:
  """Every float field finite; known numeric fields in range; enumerations valid."""
  errors = [
    f"{name}={v} must be a finite number"
    for name, v in _leaves(config)
    if isinstance(v, float) and not math.isfinite(v)
  ]
  bad = {e.split("=", 1)[0] for e in errors}
  for name, lo, hi, lo_in, hi_in in _RANGES:
    v = _get(config, name)
    if v is None or name in bad or isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    if (lo is not None and (v < lo or (v == lo and not lo_in))) or (
      hi is not None and (v > hi or (v == hi and not hi_in))
    ):
      span = (
        f"{'[' if lo_in else '('}{lo}, {hi if hi is not None else 'inf'}{']' if hi_in else ')'}"
      )
      errors.append(f"{name}={v} must be in {span}")
  for name, choices in _CHOICES:
    v = _get(config, name)
    if v is not None and v not in choices:
      errors.append(f"{name}={v!r} must be one of {choices}")
  return errors


def _batch_mesh_axes(rules) -> tuple[str, ...]:
  entry = dict(sharding.normalize_rules(rules)).get("batch")
  return sharding.spec_axes(entry)
