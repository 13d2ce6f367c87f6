"""The trainer registry: `{name: Trainer(validate, run)}`, and in-loop evaluation.

A stage (or a plain config's `trainer` field) names its trainer: 'lm' for
pre-train, mid-train and SFT (`cwm_jax.train.lm`), 'rl' for the RL stage
(`cwm_jax.rl.trainer`). Both run on the one training runtime
(`cwm_jax.train.runtime`); `validate(config)` makes every check `run` would
make before compiling, so a whole schedule is checked before any stage runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from flax import nnx

from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.base import ConfigError
from cwm_jax.infer.evaluation import EvalConfig, evaluate
from cwm_jax.model.transformer import model_from_params
from cwm_jax.rl import trainer as rl_trainer
from cwm_jax.train import lm, runtime


def evaluation_hook(config) -> runtime.Hook | None:
  """Every `config.eval_every` steps: `cwm_jax.infer.evaluation` on the current params,
  logged as `eval/*` records (None when `eval_every` is 0)."""
  if not config.get("eval_every", 0):
    return None
  path = config.data.get("tokenizer", "")
  tokenizer = Tokenizer.from_rank_file(path) if path else Tokenizer.default()

  def hook(ctx: runtime.HookContext) -> dict[str, float] | None:
    if ctx.step % config.eval_every:
      return None
    rt = ctx.runtime
    with nnx.logical_axis_rules(rt.rules):
      model = model_from_params(rt.cfg, ctx.state["params"], rt.execution)
      metrics = evaluate(model, tokenizer, config.eval)
    return {f"eval/{k}": v for k, v in metrics.items()}

  return hook


def _validate_lm(config) -> None:
  lm.validate(config)
  if config.get("eval_every", 0):
    try:
      EvalConfig.from_mapping(config.eval)
    except (ConfigError, TypeError) as e:
      raise ConfigError(f"invalid training config: eval: {e}") from e


def _train_lm(config, workdir: str, hooks: Sequence[runtime.Hook] = ()) -> dict:
  _validate_lm(config)
  evaluation = evaluation_hook(config)
  return lm.train(config, workdir, hooks=[*hooks, *([evaluation] if evaluation else [])])


@dataclasses.dataclass(frozen=True)
class Trainer:
  validate: Callable[[Any], None]
  run: Callable[..., dict]  # (config, workdir, hooks=()) -> {'step', 'records', 'preempted'}


TRAINERS: dict[str, Trainer] = {
    "lm": Trainer(_validate_lm, _train_lm),
    "rl": Trainer(rl_trainer.validate, rl_trainer.run),
}
