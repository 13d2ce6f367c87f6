"""One process of a multi-process run of the in-loop benchmarks (tests/test_train_suites.py).

  JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \\
  XLA_FLAGS=--xla_force_host_platform_device_count=D python tests/multiprocess_suites.py \\
  OUT STEPS SUITES_JSON

Trains the tiny LM of the test for STEPS steps in workdir OUT with the `suites` fields of
SUITES_JSON and writes this process's records that hold `eval/` metrics to OUT.<process id>.json.
"""

import json
import sys

import jax

from cwm_jax.parallel.mesh import initialize_distributed


def main(out: str, steps: str, suites: str) -> None:
  initialize_distributed()
  from cwm_jax.recipe import trainers
  from cwm_jax.train import config as config_lib

  jax.config.update("jax_default_matmul_precision", "highest")
  c = config_lib.base_config()
  c.total_steps, c.checkpoint_every, c.seq_len, c.batch_size = int(steps), 0, 32, 8
  c.metrics.tensorboard = False
  c.optimizer.decay_steps = int(steps)
  c.model.overrides.update(vocab_size=4352, n_layers=2)
  c.compiler_options.xla_backend_optimization_level = 0
  c.suites.update(json.loads(suites))
  result = trainers.TRAINERS["lm"].run(c, out, [])
  evals = [r for r in result["records"] if any(k.startswith("eval/") for k in r)]
  with open(f"{out}.{jax.process_index()}.json", "w") as f:
    json.dump(evals, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
