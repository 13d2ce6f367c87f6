"""Checkpoint I/O: save/restore throughput (local disk and a GCS emulator) and the train
step's time with an asynchronous save in flight.

  python benchmarks/checkpoint_io.py                    # defaults: 491 MB state, ~4 min on 2 cores
  python benchmarks/checkpoint_io.py --save             # also benchmarks/results/checkpoint_io/
  python benchmarks/checkpoint_io.py --targets local --io_rounds 5
  python benchmarks/checkpoint_io.py --dim 64 --layers 2 --vocab 256 --ffn 128 --heads 4 \
      --head_dim 16 --seq 32 --io_rounds 1 --step_rounds 1 --steps 1     # seconds (the test)

The train state is the LM trainer's own (`cwm_jax.train.runtime.setup` on the base config
with the model overrides from the flags: params + AdamW moments + step + rng, float32),
trained for a few steps so the moments are not zeros, and saved through
`cwm_jax.checkpoint.manager.Checkpointer` with the same metadata the runtime writes.
`gcs` is a fake-gcs-server started here (`tests/gcs_emulator.py`, in-memory backend, on
loopback): it measures the gs:// client path (tensorstore over HTTP, the emulator's CPU
on the same two cores), not a network. `local` is a temporary folder on the disk; its
writes land in the page cache and its reads come from it (no fsync, no cache drop), so
it bounds what orbax's own pipeline gives rather than the disk.

1. Throughput: `--io_rounds` rounds, each saving (synchronous `Checkpointer`, a fresh
   directory) then restoring (a fresh `Checkpointer`, target = the state's
   ShapeDtypeStructs with their shardings) on every target in turn (local, gcs, local,
   gcs, ...), so load drift on the shared machine hits both alike. MB/s = the state's
   bytes (1 MB = 1e6 bytes) / seconds; also the bytes of the files written (fewer:
   orbax's default zstd compresses, and the AdamW moments of embedding rows no batch
   has touched are zeros) and whether every restored leaf equals the saved one.
2. Overlap: `--step_rounds` rounds, each timing `--steps` jitted train steps (the LM
   trainer's step: state donated, one fixed full-length batch) with no save, then the
   same steps started right after `save()` of an async `Checkpointer` (per target)
   returned. Per phase: step time (median over rounds) and its ratio to the no-save
   steps in the same round; per save: the seconds `save()` blocked the caller (the
   device -> host copy and the directory set-up) and the seconds until `wait()`
   returned, counted from the `save()` call (`wait()` runs on a watcher thread, so this
   is when the save committed, even in the middle of the steps; `save_done_within_steps`
   says it did not outlast them). The last round's async checkpoints are restored and
   compared with a host copy taken before the save (the step donates the state the save
   read, so this catches a save that did not copy it first).
   Each round also measures the float32 matmul rate (`train_step.matmul_rate`: a 2048^2
   GEMM in XLA) and the step's model FLOPs (`cwm_jax.train.flops.batch_flops`) as a
   fraction of it. `train_s_lost` is what a save cost the training (the steps' extra
   seconds over the round's no-save steps, plus the blocking), beside `sync_save_s`, a
   synchronous save's seconds from part 1: the save's compression and writes run on
   the cores the step uses, so an async save can still slow the steps.

Prints one JSON object; `load_avg` is `os.getloadavg()` at the start and the end. `--save`
also writes it under benchmarks/results/checkpoint_io/ (`results_io`).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MB = 1e6

sys.path.insert(0, HERE)
import results_io


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  # Defaults: 40.9M params (8 layers of d=512, a 16K vocabulary), so params + AdamW
  # moments are 491 MB and a B=1, T=512 step is ~100 GFLOP, seconds of matmuls on two
  # cores (dispatch is noise next to it).
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--ffn", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--window", type=int, default=0, help="local window (0: seq/4)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--targets", default="local,gcs", help="comma-separated of local, gcs")
  p.add_argument("--io_rounds", type=int, default=4, help="save+restore rounds per target")
  p.add_argument("--step_rounds", type=int, default=4)
  p.add_argument("--steps", type=int, default=4, help="train steps per phase per round")
  p.add_argument(
    "--execution",
    default="{}",
    help="JSON of Execution fields (default: the base config's, as the trainer runs)",
  )
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  return p.parse_args(argv)


def _start_emulator():
  """A fake-gcs-server on a free port, named in the environment before any GCS client
  (or cwm_jax, which derives tensorstore's and gcsfs's settings from it) is imported."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  emulator = gcs_emulator.Emulator(gcs_emulator.free_port()).start()
  os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)  # derived from the variable above
  return emulator


def _config(a):
  from cwm_jax.train.config import base_config

  c = base_config()
  c.model.preset = "tiny"
  c.model.overrides.update(
    dict(
      n_layers=a.layers,
      dim=a.dim,
      n_heads=a.heads,
      n_kv_heads=a.kv_heads,
      head_dim=a.head_dim,
      ffn_dim=a.ffn,
      vocab_size=a.vocab,
      local_window=a.window or max(1, a.seq // 4),
      global_window=a.seq,
    )
  )
  c.execution.update(json.loads(a.execution))
  c.batch_size, c.seq_len = a.batch, a.seq
  c.total_steps, c.checkpoint_every = 10**6, 0  # a constant LR-schedule phase, no cadence
  c.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
  c.metrics.tensorboard = False
  return c


def _full_batch(vocab, b, t):
  """One fixed batch of full-length sequences (every token weighted): the same work
  every step, unlike the packed synthetic source's random document boundaries."""
  import numpy as np

  tokens = np.random.default_rng(0).integers(0, vocab, (b, t + 1)).astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    "segment_ids": np.ones((b, t), np.int32),
    "weights": np.ones((b, t), np.float32),
  }


def _files_bytes(path):
  """Total bytes of the files under `path` (local folder or gs:// prefix)."""
  from cwm_jax import storage

  if not storage.is_url(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  import gcsfs  # pylint: disable=g-import-not-at-top

  # A fresh filesystem: gcsfs caches listings per instance.
  return int(gcsfs.GCSFileSystem(skip_instance_cache=True).du(path))


def _host_copy(tree):
  import jax
  import numpy as np

  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _equal(got, want) -> bool:
  import jax
  import numpy as np

  eq = jax.tree.map(lambda g, w: bool(np.array_equal(np.asarray(g), np.asarray(w))), got, want)
  return jax.tree.structure(got) == jax.tree.structure(want) and all(jax.tree.leaves(eq))


def _remove(path):
  from cwm_jax import storage

  storage.remove(path)


def main(argv=None):
  a = _args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  targets = [t for t in a.targets.split(",") if t]
  unknown = sorted(set(targets) - {"local", "gcs"})
  if unknown:
    raise SystemExit(f"--targets: unknown {unknown}; use local and/or gcs")
  load_start = os.getloadavg()
  wall = time.perf_counter()
  emulator = _start_emulator() if "gcs" in targets else None
  tmp = tempfile.mkdtemp(prefix="checkpoint_io_")
  try:
    out = _run(a, targets, emulator, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if emulator is not None:
      emulator.stop()
  out["wall_s"] = round(time.perf_counter() - wall, 1)
  out["load_avg"] = {
    "start": [round(x, 2) for x in load_start],
    "end": [round(x, 2) for x in os.getloadavg()],
  }
  print(json.dumps(out))
  if a.save:
    print("saved", results_io.save("checkpoint_io", out), file=sys.stderr)


def _run(a, targets, emulator, tmp):
  import jax

  from cwm_jax.checkpoint.manager import Checkpointer, model_config_to_dict
  from cwm_jax.parallel import rows
  from cwm_jax.train import flops, lm, runtime
  from cwm_jax.train import state as state_lib

  sys.path.insert(0, HERE)
  from train_step import matmul_rate  # pylint: disable=g-import-not-at-top

  c = _config(a)
  devices = jax.devices()[:1]
  rt = runtime.setup(c, devices)
  roots = {"local": os.path.join(tmp, "ckpt")}
  if emulator is not None:
    roots["gcs"] = emulator.bucket("checkpoint-io") + "/ckpt"
  meta = {"model": model_config_to_dict(rt.cfg), "config": c.to_dict()}  # as runtime.run
  target = state_lib.with_shardings(rt.abstract, rt.shardings)
  batch_np = _full_batch(a.vocab, a.batch, a.seq)
  step_flops = flops.batch_flops(rt.cfg, batch_np["positions"], batch_np["segment_ids"])
  med = statistics.median

  trainer = lm.LMTrainer(rt)  # the trainer's cached, jitted step (state donated)
  with jax.set_mesh(rt.mesh):  # as runtime.run: the trainer is built outside the mesh
    batch = rows.global_batch(batch_np, rt.batch_sharding, a.batch)
    holder = {"state": rt.init_fn()}

    def steps(n):
      for _ in range(n):
        holder["state"], metrics = trainer.step_fn(holder["state"], batch)
      jax.block_until_ready(holder["state"])
      return float(metrics["loss"])

    start = time.perf_counter()
    steps(1)
    first_step_s = time.perf_counter() - start
    loss_start = steps(2)  # non-zero moments, and the step's host heap at its steady size
    probe = matmul_rate("ours")
    state_bytes = flops.tree_bytes(holder["state"])

    # 1. Throughput: synchronous saves and fresh restores, alternating targets.
    io = {
      t: {"save_s": [], "restore_s": [], "bytes_written": [], "restored_equal": []} for t in targets
    }
    for r in range(a.io_rounds):
      for t in targets:
        path = f"{roots[t]}/io{r}"
        ckpt = Checkpointer(path, max_to_keep=None, async_save=False)
        start = time.perf_counter()
        ckpt.save(1, holder["state"], meta=meta)
        ckpt.wait()
        io[t]["save_s"].append(time.perf_counter() - start)
        ckpt.close()
        io[t]["bytes_written"].append(_files_bytes(path))
        ckpt = Checkpointer(path, max_to_keep=None, async_save=False, create=False)
        start = time.perf_counter()
        got = jax.block_until_ready(ckpt.restore(1, target))
        io[t]["restore_s"].append(time.perf_counter() - start)
        ckpt.close()
        io[t]["restored_equal"].append(_equal(got, holder["state"]))
        del got
        _remove(path)

    # 2. Overlap: N steps with no save, then N steps right after each target's async save.
    phases = ["none"] + targets
    step_s = {p: [] for p in phases}
    block_s = {t: [] for t in targets}
    total_s = {t: [] for t in targets}
    save_done_in_steps = {t: [] for t in targets}
    async_equal = {}
    mm = []
    for r in range(a.step_rounds):
      last = r == a.step_rounds - 1
      for p in phases:
        if p == "none":
          start = time.perf_counter()
          steps(a.steps)
          step_s[p].append((time.perf_counter() - start) / a.steps)
          continue
        path = f"{roots[p]}/async{r}"
        ckpt = Checkpointer(path, max_to_keep=None, async_save=True)
        saved = _host_copy(holder["state"]) if last else None
        finished = {}
        start = time.perf_counter()
        ckpt.save(1, holder["state"], meta=meta)
        block = time.perf_counter() - start
        # wait() on a watcher thread: it returns when the save commits, which may be in
        # the middle of the steps; the main thread only joins it after them.
        watcher = threading.Thread(
          target=lambda: (ckpt.wait(), finished.update(t=time.perf_counter()))
        )
        watcher.start()
        steps(a.steps)
        steps_end = time.perf_counter()
        watcher.join()
        block_s[p].append(block)
        step_s[p].append((steps_end - start - block) / a.steps)
        total_s[p].append(finished["t"] - start)
        save_done_in_steps[p].append(finished["t"] <= steps_end)
        ckpt.close()
        if last:
          ckpt = Checkpointer(path, max_to_keep=None, async_save=False, create=False)
          async_equal[p] = _equal(jax.block_until_ready(ckpt.restore(1, target)), saved)
          ckpt.close()
          del saved
        _remove(path)
      mm.append(probe())
    loss_end = steps(1)

  def rounds(xs, nd=3):
    return [round(x, nd) for x in xs]

  def io_report(t):
    d = io[t]
    save_mb_s = [state_bytes / MB / s for s in d["save_s"]]
    restore_mb_s = [state_bytes / MB / s for s in d["restore_s"]]
    return {
      "save_mb_s": round(med(save_mb_s), 1),
      "restore_mb_s": round(med(restore_mb_s), 1),
      "save_mb_s_rounds": rounds(save_mb_s, 1),
      "restore_mb_s_rounds": rounds(restore_mb_s, 1),
      "save_s_rounds": rounds(d["save_s"]),
      "restore_s_rounds": rounds(d["restore_s"]),
      "bytes_written": d["bytes_written"][0]
      if len(set(d["bytes_written"])) == 1
      else d["bytes_written"],
      "restored_equal": all(d["restored_equal"]),
    }

  def ratio(p):  # per round, so each save phase is compared with its own round's steps
    return round(med([s / n for s, n in zip(step_s[p], step_s["none"])]), 3)

  def lost(p):
    return [(s - n) * a.steps + b for s, n, b in zip(step_s[p], step_s["none"], block_s[p])]

  none_ms = med(step_s["none"])
  train = {
    "batch": a.batch,
    "seq_len": a.seq,
    "steps_per_phase": a.steps,
    "rounds": a.step_rounds,
    "first_step_s": round(first_step_s, 2),
    "flops_per_step": step_flops,
    "matmul_gflop_per_s": round(med(mm) / 1e9, 1),
    "matmul_gflop_per_s_rounds": rounds([m / 1e9 for m in mm], 1),
    "step_s_no_save": round(none_ms, 4),
    "step_s_no_save_rounds": rounds(step_s["none"], 4),
    # Model FLOP/s of the no-save steps over the GEMM rate of the same round.
    "fraction_of_matmul_rate": round(
      med([step_flops / s / m for s, m in zip(step_s["none"], mm)]), 3
    ),
    "loss_start": loss_start,
    "loss_end": loss_end,
    "save_in_flight": {
      p: {
        "step_s": round(med(step_s[p]), 4),
        "step_s_rounds": rounds(step_s[p], 4),
        "step_time_ratio": ratio(p),
        "save_blocking_s": round(med(block_s[p]), 3),
        "save_blocking_s_rounds": rounds(block_s[p]),
        "save_total_s": round(med(total_s[p]), 3),
        "save_total_s_rounds": rounds(total_s[p]),
        # What the save cost the training: the steps' extra seconds over the same round's
        # no-save steps, plus the blocking; to compare with a synchronous save's seconds.
        "train_s_lost": round(med(lost(p)), 3),
        "train_s_lost_rounds": rounds(lost(p)),
        "sync_save_s": round(med(io[p]["save_s"]), 3) if io[p]["save_s"] else None,
        "save_done_within_steps": save_done_in_steps[p],
        "async_restored_equal": async_equal.get(p),
      }
      for p in targets
    },
  }
  cfg = rt.cfg
  return {
    "benchmark": "checkpoint_io",
    "device_kind": devices[0].device_kind,
    "devices": len(devices),
    "cpu_count": os.cpu_count(),
    "model": {
      "dim": cfg.dim,
      "n_layers": cfg.n_layers,
      "n_heads": cfg.n_heads,
      "n_kv_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "ffn_dim": cfg.ffn_dim,
      "vocab_size": cfg.vocab_size,
      "layer_windows": list(cfg.layer_windows),
      "params": cfg.param_count(),
    },
    "execution": vars(rt.execution),
    "state_bytes": state_bytes,
    "state_mb": round(state_bytes / MB, 1),
    "state_leaves": len(jax.tree.leaves(holder["state"])),
    "io_rounds": a.io_rounds,
    "io": {t: io_report(t) for t in targets},
    "restored_equal": all(all(io[t]["restored_equal"]) for t in targets)
    and all(v is not False for v in async_equal.values()),
    "train": train,
  }


if __name__ == "__main__":
  main()
