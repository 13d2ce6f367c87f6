"""The trainer registry: `{name: Trainer(validate, run)}`, in-loop evaluation and exports.

A stage (or a plain config's `trainer` field) names its trainer: 'lm' for
pre-train, mid-train and SFT (`cwm_jax.train.lm`), 'rl' for the RL stage
(`cwm_jax.rl.trainer`). Both run on the one training runtime
(`cwm_jax.train.runtime`); `validate(config)` makes every check `run` would
make before compiling, so a whole schedule is checked before any stage runs. The LM trainer
adds two hooks of its own: evaluation every `eval_every` steps and a Hugging Face export every
`export.every` steps (`ExportHook`, in a background thread). Both trainers run the standard
code benchmarks of the `suites` section every `suites.every` steps (`suite_hook`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from flax import nnx

from cwm_jax import storage
from cwm_jax.base import ConfigError
from cwm_jax.checkpoint import manager
from cwm_jax.checkpoint.conversion import convert
from cwm_jax.data.tokenizer import Tokenizer
from cwm_jax.infer import benchmarks
from cwm_jax.infer.evaluation import EvalConfig, evaluate
from cwm_jax.model.transformer import model_from_params
from cwm_jax.parallel import rows
from cwm_jax.rl import trainer as rl_trainer
from cwm_jax.train import lm, runtime
from cwm_jax.train.config import model_config


def _tokenizer(config) -> Tokenizer:
  path = config.data.get("tokenizer", "")
  return Tokenizer.from_rank_file(path) if path else Tokenizer.default()


def evaluation_hook(config) -> runtime.Hook | None:
  """Every `config.eval_every` steps: `cwm_jax.infer.evaluation` on the current params,
  logged as `eval/*` records (None when `eval_every` is 0)."""
  if not config.get("eval_every", 0):
    return None
  tokenizer = _tokenizer(config)

  def hook(ctx: runtime.HookContext) -> dict[str, float] | None:
    if ctx.step % config.eval_every:
      return None
    rt = ctx.runtime
    with nnx.logical_axis_rules(rt.rules):
      model = model_from_params(rt.cfg, ctx.state["params"], rt.execution)
      metrics = evaluate(model, tokenizer, config.eval)
    return {f"eval/{k}": v for k, v in metrics.items()}

  return hook


def suite_eval(config) -> benchmarks.SuiteEval | None:
  """The `suites` section checked and loaded (ConfigError naming the field, before anything
  compiles); None when it is off."""
  section = config.get("suites")
  if section is None:
    return None
  try:
    suites = benchmarks.SuiteConfig.from_mapping(section)
    return (
      benchmarks.SuiteEval(suites, _tokenizer(config), model_config(config))
      if suites.every
      else None
    )
  except ConfigError as e:
    raise ConfigError(f"invalid training config: {e}") from e


def suite_hook(config, workdir: str) -> runtime.Hook | None:
  """Every `suites.every` steps: the standard benchmarks of the `suites` section sampled with
  the current params, as they are sharded (rows split over the training mesh's batch axes),
  and scored in the sandbox; `eval/SUITE/*` metrics, per-sample rows in
  WORKDIR/suites/SUITE/step_N.jsonl (None when the section is off)."""
  suites = suite_eval(config)
  if suites is None:
    return None
  results = storage.join(workdir, "suites")

  def hook(ctx: runtime.HookContext) -> dict[str, float] | None:
    if ctx.step % suites.config.every:
      return None
    rt = ctx.runtime
    with nnx.logical_axis_rules(rt.rules):
      model = model_from_params(rt.cfg, ctx.state["params"], rt.execution)
      return suites(model, ctx.step, rows.row_sharding(rt.batch_sharding), results)

  return hook


class ExportHook:
  """Every `config.export.every` steps, a Hugging Face export of that step's checkpoint into
  `WORKDIR/hf/step_N` (a gs:// workdir too), made off the step's path.

  The hook itself only starts a thread and returns: the thread waits until the step's
  checkpoint has committed (the runtime saves it, possibly asynchronously, just before the
  hooks run; `validate` makes `export.every` a multiple of `checkpoint_every` so that the step
  has one), then converts it (`conversion.convert`: tokenizer and generation config included,
  staged so that a reader never sees half an export). Only process 0 exports: every process
  would write the same files. A finished export is logged at the next step as `export/step`;
  a failed one (e.g. its checkpoint already rotated away by `max_to_keep`) is a warning, never
  a crash of the run. `close` waits for the exports under way.
  """

  def __init__(self, config, workdir: str, poll_s: float = 0.2):
    self.every, self.poll_s = int(config.export.every), poll_s
    self.ckpt_dir = storage.join(workdir, "checkpoints")
    self.out_root = storage.join(workdir, "hf")
    self.primary = jax.process_index() == 0
    self.threads: list[threading.Thread] = []
    self.done: list[dict] = []  # summaries of finished exports, in finishing order
    self._unreported: list[dict] = []
    self._lock = threading.Lock()
    self._closing = threading.Event()

  def __call__(self, ctx: runtime.HookContext) -> dict[str, float] | None:
    with self._lock:
      report, self._unreported = self._unreported, []
    if self.primary and ctx.step % self.every == 0:
      thread = threading.Thread(
        target=self._export, args=(ctx.step,), name=f"hf-export-{ctx.step}", daemon=True
      )
      thread.start()
      self.threads.append(thread)
    ok = [r for r in report if "error" not in r]
    return {"export/step": float(ok[-1]["step"])} if ok else None

  def _committed(self, step: int) -> bool:
    return step in manager.complete_steps(self.ckpt_dir)

  def _export(self, step: int) -> None:
    out = storage.join(self.out_root, f"step_{step}")
    try:
      while not self._committed(step):
        if self._closing.is_set() and not self._committed(step):
          raise ConfigError(f"checkpoint step {step} never committed in {self.ckpt_dir}")
        time.sleep(self.poll_s)
      if storage.isfile(storage.join(out, "config.json")):
        summary = {"step": step, "hf": out, "skipped": "exists"}  # a resumed run
      else:
        summary = {"step": step, "hf": out, **convert(self.ckpt_dir, out, "hf", step=step)}
      logging.info("exported step %d to %s", step, out)
    except Exception as e:  # pylint: disable=broad-except  (an export never stops training)
      logging.warning("Hugging Face export of step %d to %s failed: %s", step, out, e)
      summary = {"step": step, "hf": out, "error": str(e)}
    with self._lock:
      self.done.append(summary)
      self._unreported.append(summary)

  def close(self) -> list[dict]:
    """Waits for every export started (the run's last checkpoint has committed by now);
    returns their summaries in step order."""
    self._closing.set()
    for thread in self.threads:
      thread.join()
    return sorted(self.done, key=lambda r: r["step"])


def export_hook(config, workdir: str) -> ExportHook | None:
  """The `ExportHook` of `config` (None when `export.every` is 0, the default)."""
  every = (config.get("export") or {}).get("every", 0)
  return ExportHook(config, workdir) if every else None


def _validate_lm(config) -> None:
  lm.validate(config)
  if config.get("eval_every", 0):
    try:
      EvalConfig.from_mapping(config.eval)
    except (ConfigError, TypeError) as e:
      raise ConfigError(f"invalid training config: eval: {e}") from e
  suite_eval(config)


def _train_lm(config, workdir: str, hooks: Sequence[runtime.Hook] = ()) -> dict:
  _validate_lm(config)
  own = [
    h
    for h in (evaluation_hook(config), suite_hook(config, workdir), export_hook(config, workdir))
    if h is not None
  ]
  exporter = next((h for h in own if isinstance(h, ExportHook)), None)
  try:
    out = lm.train(config, workdir, hooks=[*hooks, *own])
  finally:
    exports = exporter.close() if exporter is not None else None
  return {**out, "exports": exports} if exports is not None else out


@dataclasses.dataclass(frozen=True)
class Trainer:
  validate: Callable[[Any], None]
  run: Callable[..., dict]  # (config, workdir, hooks=()) -> {'step', 'records', 'preempted'}


def _validate_rl(config) -> None:
  rl_trainer.validate(config)
  suite_eval(config)


def _train_rl(config, workdir: str, hooks: Sequence[runtime.Hook] = ()) -> dict:
  _validate_rl(config)
  own = suite_hook(config, workdir)
  return rl_trainer.run(config, workdir, [*hooks, *([own] if own else [])])


TRAINERS: dict[str, Trainer] = {
  "lm": Trainer(_validate_lm, _train_lm),
  "rl": Trainer(_validate_rl, _train_rl),
}
