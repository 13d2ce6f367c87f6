"""Fault injection for tests (never imported by the package).

python tests/faults.py train --kill_at_step=N [--kill_process=K] <flags of python -m
    cwm_jax.train> runs the training program with a hook that SIGKILLs the process (only
    process K of a multi-process job, if given) right after step N, once that step's
    checkpoints are on disk (with --kill_mid_save: at once, while that step's
    asynchronous save is still writing);
python tests/faults.py train --term_parent_at_step=N <flags>: process 0 sends SIGTERM
    to its parent (the launcher, which forwards it: a cluster's preemption notice) right
    after step N;
python tests/faults.py convert --kill_after_tensors=N <flags of python -m cwm_jax.convert>
    runs the conversion program and SIGKILLs it after N tensors were converted.
"""

import os
import signal
import sys

from absl import flags


def _kill():
  os.kill(os.getpid(), signal.SIGKILL)


def train_with_kill() -> None:
  from cwm_jax.cli import run_main
  from cwm_jax.train import __main__ as program

  kill_at = flags.DEFINE_integer("kill_at_step", 0, "SIGKILL right after this step.")
  kill_process = flags.DEFINE_integer("kill_process", -1, "Only this process is killed.")
  mid_save = flags.DEFINE_boolean("kill_mid_save", False, "Kill before the save finishes.")
  term_at = flags.DEFINE_integer("term_parent_at_step", 0, "SIGTERM the launcher then.")
  import jax  # pylint: disable=g-import-not-at-top

  def hook(ctx):
    if ctx.step == kill_at.value and kill_process.value in (-1, jax.process_index()):
      if not mid_save.value:
        ctx.checkpointer.wait()
      _kill()
    if ctx.step == term_at.value and jax.process_index() == 0:
      os.kill(os.getppid(), signal.SIGTERM)

  run_main(lambda argv: program.main(argv, hooks=[hook]), quiet=False)


def convert_with_kill() -> None:
  from cwm_jax import convert as program
  from cwm_jax.checkpoint import conversion
  from cwm_jax.cli import run_main

  after = flags.DEFINE_integer("kill_after_tensors", 0, "SIGKILL after this many tensors.")
  count = conversion._Counter.__call__  # pylint: disable=protected-access

  def counting(self, x):
    out = count(self, x)
    if self.tensors > after.value:
      _kill()
    return out

  conversion._Counter.__call__ = counting  # pylint: disable=protected-access
  run_main(program.main)


if __name__ == "__main__":
  mode = sys.argv.pop(1)
  {"train": train_with_kill, "convert": convert_with_kill}[mode]()
