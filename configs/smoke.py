"""Smoke training config: a tiny CWM, minutes on a laptop CPU.

  python -m cwm_jax.train --config configs/smoke.py --workdir /tmp/smoke
  python -m cwm_jax.train --config configs/smoke.py:dtype=bfloat16,accum=2 \
      --workdir /tmp/smoke --config.total_steps=20 --config.mesh.fsdp=4

Variants (`:key=value,...`): dtype=float32|bfloat16 (compute dtype),
accum=K (gradient accumulation), remat=POLICY, schedule=cosine|linear|wsd|constant,
source=synthetic|grain (default: synthetic, grain for the stage schedule),
corpus_limit=N (stage schedule: at most N files/calls per embedded corpus),
traces=programs|repo (midtrain traces: shipped programs + doctests, or the repository traces
of a few standard-library test modules, `repo_traces`).

Stage schedule (cwm_jax.recipe.stages): `schedule=all` runs pretrain (T=64,
plain RoPE) -> midtrain (T=128, RoPE scaling on, optimizer and LR schedule
carried over) -> sft (T=96, fresh optimizer, prompt tokens out of the loss),
each in WORKDIR/STAGE/, resumable; `stage=NAME` runs only that stage. With
grain (the default here) the stages read the embedded corpora, built once into
WORKDIR/data/{code,traces,sft}/: pretrain the stdlib code, midtrain traces +
code, sft the trace/output-prediction dialogs; documents longer than T are
split into pieces. `source=synthetic` runs the same hand-offs on random tokens
in 20 steps (tests):

  python -m cwm_jax.train --config configs/smoke.py:schedule=all --workdir runs/smoke
  python -m cwm_jax.train --config configs/smoke.py:stage=midtrain --workdir runs/smoke

`stage=rl` runs the RL stage (cwm_jax.rl: GRPO on the embedded code/math/trace/toy
tasks with sandboxed verifiers) from scratch, after a short supervised warmup on the
tasks' reference answers:

  python -m cwm_jax.train --config configs/smoke.py:stage=rl --workdir runs/smoke_rl
"""

import ml_collections

from cwm_jax.base import ConfigError, check_fields
from cwm_jax.train.config import base_config, parse_variant

VARIANTS = ("dtype", "accum", "remat", "schedule", "source", "stage", "corpus_limit", "traces")
STAGES = ("pretrain", "midtrain", "sft")
# Caps of the embedded corpora (stdlib files / traced calls) so they build in seconds.
CORPUS_LIMITS = dict(code=200, traces=56, sft=56, repo_traces=6)  # repo_traces: test modules
# (pretrain, midtrain, sft) steps and checkpoint interval: a few CPU minutes on the corpora;
# synthetic data only checks the plumbing (stage hand-offs, resume) in seconds.
STEPS = dict(grain=((300, 150, 150), 50), synthetic=((8, 6, 6), 4))


def get_config(arg: str | None = None):
  c = base_config()
  variant = parse_variant(arg)
  check_fields(variant, VARIANTS, "configs/smoke.py", "variant keys")
  c.model.preset = "tiny"
  c.model.overrides.update(
    dict(
      n_layers=4,
      dim=64,
      n_heads=4,
      n_kv_heads=2,
      head_dim=16,
      ffn_dim=128,
      vocab_size=512,
      local_window=16,
    )
  )
  c.execution.compute_dtype = variant.get("dtype", "float32")
  c.execution.remat_policy = variant.get("remat", "none")
  c.grad_accum = int(variant.get("accum", 1))
  schedule = variant.get("schedule", "cosine")
  c.optimizer.schedule = "cosine" if schedule == "all" else schedule
  staged = schedule == "all" or variant.get("stage") in STAGES
  c.data.source = variant.get("source", "grain" if staged else "synthetic")
  if c.data.source == "grain":  # the grain pipeline's fields; then set data.mixture
    from cwm_jax.data.pipeline import default_data_config  # pylint: disable=g-import-not-at-top

    c.data.update(default_data_config())
    c.data.long_documents = "split"  # stdlib files and traces are longer than T
    c.data.shuffle_window = 256  # so a batch mixes pieces of several documents
  if variant.get("stage") == "rl":
    return add_rl_stage(c)
  if schedule == "all" or "stage" in variant:
    limit = int(variant.get("corpus_limit", 0)) or None
    add_stages(
      c, only=variant.get("stage", ""), corpus_limit=limit, traces=variant.get("traces", "programs")
    )
  return c


def add_stages(c, only: str = "", corpus_limit: int | None = None, traces: str = "programs"):
  """The tiny pre -> mid -> SFT schedule (meshes differ so stages reshard)."""
  if only and only not in STAGES:
    raise ConfigError(f"configs/smoke.py: stage={only!r} must be one of {STAGES}")
  (pre, mid, sft), c.checkpoint_every = STEPS["grain" if c.data.source == "grain" else "synthetic"]
  # The project tokenizer's vocabulary (4352), so the model reads the corpora and can sample.
  from cwm_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  c.model.overrides.vocab_size = Tokenizer.default().vocab_size
  data = stage_data(c.data.source, corpus_limit, traces)
  stages = dict(
    pretrain=dict(
      seq_len=64,
      batch_size=8,
      steps=pre,
      global_window=64,
      rope_scaling=False,
      mesh=dict(data=1, fsdp=-1),
      start_from="scratch",
      data=data["pretrain"],
      optimizer=dict(lr=3e-3, warmup_steps=2, schedule="cosine"),
    ),
    midtrain=dict(
      seq_len=128,
      batch_size=8,
      steps=mid,
      global_window=128,
      rope_scaling=True,
      mesh=dict(data=-1, fsdp=1),
      carry_optimizer=True,
      data=data["midtrain"],
    ),
    sft=dict(
      seq_len=96,
      batch_size=8,
      steps=sft,
      global_window=128,
      rope_scaling=True,
      mesh=dict(data=1, fsdp=-1),
      data=data["sft"],
      optimizer=dict(lr=1e-3, warmup_steps=1, schedule="constant"),
    ),
  )
  c.schedule = ml_collections.ConfigDict(
    dict(order=",".join(STAGES), only=only, finish=True, sample_tokens=48, stages=stages)
  )
  return c


def stage_data(source: str, corpus_limit: int | None = None, traces: str = "programs") -> dict:
  """Per-stage data: the embedded corpora (grain; built into WORKDIR/data/NAME on first use,
  at most `corpus_limit` files/calls each) or synthetic tokens with half of each SFT
  document as zero-weight prompt."""
  if traces not in ("programs", "repo"):
    raise ConfigError(f"configs/smoke.py: traces={traces!r} must be programs or repo")
  if source != "grain":
    return dict(pretrain={}, midtrain={}, sft=dict(prompt_fraction=0.5))
  trace_corpus = "repo_traces" if traces == "repo" else "traces"
  corpus = lambda name, weight=1.0: dict(
    kind="corpus",
    name=name,
    weight=weight,
    limit=min(CORPUS_LIMITS[name], corpus_limit or CORPUS_LIMITS[name]),
  )
  return dict(
    pretrain=dict(mixture=[corpus("code")]),
    # CWM mid-train: world-model (trace) data mixed with code.
    midtrain=dict(mixture=[corpus(trace_corpus, 0.6), corpus("code", 0.4)]),
    # Trace/output-prediction dialogs; only assistant turns carry loss weight.
    sft=dict(mixture=[corpus("sft")]),
  )


def add_rl_stage(c):
  """The schedule plus an `rl` stage (trainer='rl'), selected alone. It starts from scratch
  (the smoke SFT model is trained on synthetic tokens, so it knows no more than a fresh
  one); a real recipe sets start_from='previous' to continue from SFT."""
  from cwm_jax.rl.trainer import rl_config  # pylint: disable=g-import-not-at-top

  add_stages(c)
  c.rl = rl_config()
  c.rl.update(
    tasks="toy,math,code", group_size=4, max_new_tokens=24, warmup_steps=30, sandbox_timeout_s=2.0
  )  # add 'trace' with seq_len >= 320 (longer prompts)
  c.schedule.stages.rl = dict(
    seq_len=80,
    batch_size=32,
    steps=60,
    global_window=128,
    rope_scaling=True,
    mesh=dict(data=-1, fsdp=1),
    start_from="scratch",
    trainer="rl",
    optimizer=dict(lr=1e-2, warmup_steps=2, schedule="constant", weight_decay=0.0),
  )
  c.schedule.order += ",rl"
  c.schedule.only = "rl"
  return c
