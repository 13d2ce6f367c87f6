"""The CWM 32B recipe (CWM technical report): pre-train -> mid-train -> SFT (-> RL).

Every stage runs in WORKDIR/STAGE/ of one schedule root, so each launch below
starts from the previous stage's final checkpoint (GCS paths work as workdirs):

  # pre-train: 8T tokens at 8192, plain RoPE (theta 1e6, no scaling)
  python -m cwm_jax.train --config configs/cwm_32b.py:stage=pretrain --workdir $ROOT
  # mid-train: 5T tokens at 131072, llama3 RoPE scaling on; optimizer + LR schedule carried
  python -m cwm_jax.train --config configs/cwm_32b.py:stage=midtrain --workdir $ROOT
  # SFT: 100B tokens at 32768, fresh optimizer, prompt tokens out of the loss
  python -m cwm_jax.train --config configs/cwm_32b.py:stage=sft --workdir $ROOT
  # all three in order (resumable): configs/cwm_32b.py:schedule=all
  # RL (~172B tokens, GRPO recipe in config.rl) is run by the RL trainer from $ROOT/sft.

On a cluster wrap the same command with launch/{slurm.sbatch,tpu_pod.sh,k8s_jobset.py,xpk.py}
(docs/cluster.md).
Variants `slice=v5p-512` (default) or `slice=v6e-256` pick per-stage meshes and
micro-batching that fit that slice; check one with the TPU compiler first (no TPU needed):
`python -m cwm_jax.plan --config configs/cwm_32b.py:stage=midtrain,slice=v6e-256
--topology v6e-256`. Attention is 'auto' (splash on TPU, cuDNN on GPU). Start from Meta's released weights instead of
scratch with `--config.schedule.stages.sft.start_from=DIR` (a directory made
by `python -m cwm_jax.convert --to orbax`).

Figures that are NOT public (learning rates, batch sizes, warmup, weight
decay, meshes) are fields with the stated defaults below: plausible values
for a dense 32B model at ~16M tokens per step, not Meta's.
"""

import ml_collections

from cwm_jax.base import ConfigError
from cwm_jax.rl.trainer import rl_config
from cwm_jax.train.config import base_config, parse_variant

STAGES = ("pretrain", "midtrain", "sft", "rl")
T, B = 1e12, 1e9

# Data mixtures (weights per corpus; SPEC: mid-train 30% CWM data, 40% code, 30% rehearsal).
# Each corpus is read as ArrayRecord shards from DATA_ROOT/NAME (variant `data_root=`); build
# them with `python -m cwm_jax.data.build` or any writer of the records in README "Records".
DATA_ROOT = "/data/cwm"  # (default)
PRETRAIN_MIX = dict(code=0.30, text=0.70)
MIDTRAIN_MIX = dict(
  traces=0.10,
  agentic=0.08,
  pull_requests=0.06,
  compiler_ir=0.02,
  kernels=0.02,
  lean=0.02,
  code=0.40,
  rehearsal=0.30,
)
SFT_MIX = dict(reasoning=0.6, chat=0.2, agentic=0.1, traces=0.1)


def _mixture(weights: dict, root: str) -> list[dict]:
  return [dict(kind="array_record", path=f"{root}/{name}", weight=w) for name, w in weights.items()]


# Per-stage layouts for each slice (variant `slice=`): mesh, micro-batches, RL batch. Each
# was compiled with libtpu for that slice (`python -m cwm_jax.plan --config
# configs/cwm_32b.py:stage=STAGE,slice=SLICE --topology SLICE`; README "Planner" table).
# Parameters and optimizer state are sharded over fsdp x sequence (see RULES), so a
# sequence axis does not replicate the 391 GB train state. 256 chips each.
SLICES = {
  "v5p-512": dict(  # 256 v5p chips, 95 GiB HBM each
    # Pretrain keeps the matmul outputs (remat 'dots'): the forward's projections are not
    # recomputed in the backward, and the saved activations still fit a v5p chip's HBM. The
    # other stages keep only the attention kernels' outputs (remat 'attention', the stage
    # default): the backward reruns the projections but not the attention forward
    # (TPU cost model estimate and memory: benchmarks/results/tpu_plan/).
    pretrain=dict(mesh=dict(data=1, fsdp=256, tensor=1, sequence=1), grad_accum=8, remat="dots"),
    midtrain=dict(mesh=dict(data=1, fsdp=32, tensor=1, sequence=8), grad_accum=4),
    sft=dict(mesh=dict(data=1, fsdp=64, tensor=1, sequence=4), grad_accum=4),
    # RL: half of every host's chips train (fsdp x sequence), half decode in 32 replicas of
    # 4 chips; 128 rollouts of 131k tokens per update (16M tokens), 16 per micro-batch.
    rl=dict(
      mesh=dict(data=1, fsdp=16, tensor=1, sequence=8),
      batch_size=128,
      grad_accum=8,
      rl=dict(rollout_devices=128, rollout_tensor=4),
    ),
  ),
  "v6e-256": dict(  # 256 v6e chips, 32 GiB HBM each
    pretrain=dict(mesh=dict(data=1, fsdp=256, tensor=1, sequence=1), grad_accum=8),
    midtrain=dict(mesh=dict(data=1, fsdp=16, tensor=1, sequence=16), grad_accum=8),
    sft=dict(mesh=dict(data=1, fsdp=64, tensor=1, sequence=4), grad_accum=4),
    # RL: 128 chips train, 128 decode in 16 replicas of 8 chips; 128 rollouts per update.
    # A replica prefilling 8 prompts of 98k tokens at once outgrows a v6e chip's HBM, so
    # the replicas sample 2 rows at a time each (continuous batching, 32 slots). The update
    # recomputes the attention kernels too (remat 'full'): their saved outputs at 131k
    # tokens would not fit next to the trainer's share of the state.
    rl=dict(
      mesh=dict(data=1, fsdp=8, tensor=1, sequence=16),
      batch_size=128,
      grad_accum=16,
      remat="full",
      rl=dict(rollout_devices=128, rollout_tensor=8, rollout_slots=32),
    ),
  ),
}
RULES_OVERRIDES = {"embed": ["fsdp", "sequence"]}  # ZeRO-3 over every device of the slice


def _stages(root: str, slice_name: str) -> dict:
  """Stage fields; unknown figures are marked (default)."""
  stages = dict(
    pretrain=dict(
      tokens=8 * T,
      seq_len=8192,
      global_window=8192,
      rope_scaling=False,
      batch_size=2048,  # (default) 16.8M tok/step
      optimizer=dict(
        lr=3e-4,
        warmup_steps=2000,
        schedule="cosine",  # (default)
        min_lr_ratio=0.1,
        weight_decay=0.1,
      ),
      data=dict(mixture=_mixture(PRETRAIN_MIX, root)),
      remat="attention",
      # 8k keys: splash's one-kernel backward keeps its partial dq per key block small.
      execution=dict(splash_fused_backward=True),
      start_from="scratch",
    ),
    midtrain=dict(
      tokens=5 * T,
      seq_len=131072,
      global_window=131072,
      rope_scaling=True,
      batch_size=128,  # (default) 16.8M tok/step
      data=dict(mixture=_mixture(MIDTRAIN_MIX, root)),
      remat="attention",
      carry_optimizer=True,
    ),
    sft=dict(
      tokens=100 * B,
      seq_len=32768,
      global_window=131072,
      rope_scaling=True,
      batch_size=256,  # (default) 8.4M tok/step
      optimizer=dict(
        lr=1e-5,
        warmup_steps=100,
        schedule="cosine",  # (default)
        min_lr_ratio=0.1,
        weight_decay=0.1,
      ),
      data=dict(mixture=_mixture(SFT_MIX, root)),
      remat="attention",
    ),
    rl=dict(
      tokens=172 * B,
      seq_len=131072,
      global_window=131072,
      rope_scaling=True,
      optimizer=dict(lr=1e-6, warmup_steps=0, schedule="constant"),  # (default)
      remat="attention",
      trainer="rl",
    ),
  )
  for name, layout in SLICES[slice_name].items():  # (default) meshes, accumulation, RL batch
    stages[name].update(layout)
  return stages


def _rl(root: str) -> ml_collections.ConfigDict:
  """SPEC's GRPO variant in the RL trainer's schema (`cwm_jax.rl.trainer.rl_config`; any other
  field is an error): advantages R - mean(R) without std, clip-higher eps 0.2 / 0.25, no KL
  term, the loss divided by a fixed max length, all-zero-advantage groups skipped, +1/-1
  verifier rewards, asynchronous rollouts with stale ones dropped. Tasks are JSONL task files
  (code, math, trace, agentic with tools) under DATA_ROOT/rl."""
  c = rl_config()
  c.update(
    dict(
      task_files=f"{root}/rl",
      group_size=8,  # (default) group size
      max_new_tokens=32768,
      loss_max_len=131072,  # (default) response budget
      eps_low=0.2,
      eps_high=0.25,
      temperature=1.0,
      top_p=1.0,
      # Rollouts on chips of their own (rollout_devices, per slice), sampled up to 8 policy
      # versions ahead of the update that uses them, from bfloat16 replicas.
      async_rollouts=True,
      max_staleness=8,
      rollout_dtype="bfloat16",
      max_turns=32,
      episode_tokens=131072,
      episode_seconds=1800.0,  # (default)
      verifier_workers=32,
      sandbox_timeout_s=30.0,
      sandbox_memory_mb=4096,
    )
  )
  return c


def get_config(arg: str | None = None):
  variant = parse_variant(arg)
  unknown = sorted(set(variant) - {"stage", "schedule", "data_root", "slice"})
  stage = variant.get("stage", "")
  slice_name = variant.get("slice", "v5p-512")
  if (
    unknown
    or (stage and stage not in STAGES)
    or variant.get("schedule", "all") != "all"
    or slice_name not in SLICES
  ):
    raise ConfigError(
      f"configs/cwm_32b.py: use stage={'|'.join(STAGES)} or schedule=all "
      f"[,slice={'|'.join(SLICES)}][,data_root=DIR] "
      f"(got {arg!r})"
    )
  c = base_config()
  c.model.preset = "cwm_32b"
  # 'auto': splash on TPU, cuDNN on GPU, chunked on CPU. Sequence shards hold the zigzag
  # layout (chunks r and 2n - 1 - r), so causal attention costs the same on every shard;
  # K/V are all-gathered over `sequence` for every layer.
  c.execution.update(
    dict(
      param_dtype="float32",
      compute_dtype="bfloat16",
      attention_impl="auto",
      attention_chunk=512,
      scan_layers=True,
      remat_policy="full",
      context_parallel="zigzag",
    )
  )
  c.rules = [[name, RULES_OVERRIDES.get(name, axes)] for name, axes in c.rules]
  c.checkpoint_every = 1000  # (default)
  c.log_every = 10
  c.loss.chunk = 1024  # vocab projection in chunks of 1024 tokens
  c.optimizer.update(dict(b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))  # (default)
  c.data.source = "grain"
  c.checkpoint.max_to_keep = 3
  c.rl = _rl(variant.get("data_root", DATA_ROOT))
  order = "pretrain,midtrain,sft" if stage != "rl" else ",".join(STAGES)
  c.schedule = ml_collections.ConfigDict(
    dict(
      order=order,
      only=stage,
      finish=False,
      stages=_stages(variant.get("data_root", DATA_ROOT), slice_name),
    )
  )
  return c
