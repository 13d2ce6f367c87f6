"""Train-step tokens/s against transformers' CwmForCausalLM, where compute dominates.

  python benchmarks/train_step.py                       # both configs, prints one JSON object
  python benchmarks/train_step.py --configs d512 --rounds 8 --steps 3
  python benchmarks/train_step.py --configs d256 --variant '{"attention_chunk": 64}'
  python benchmarks/train_step.py --breakdown           # adds both sides' per-part milliseconds
  python benchmarks/train_step.py --save                # also benchmarks/results/train_step/

Both sides run forward + backward + AdamW (lr 1e-3, wd 0.1, no clipping) in float32 on
the same config, batch and thread count. Ours is `cwm_jax.train.step` jitted with the
state donated, under `--execution` (default EXECUTION: the chunked backend that 'auto'
picks on CPU, blocks sized by `resolve_chunk`, layers unrolled), plus any `--variant`
executions.
Each side lives in its own process (torch's and XLA's thread pools would otherwise
spin against each other) and idles while another runs. Both keep freed host memory for
reuse, as our programs do on a CPU (`cwm_jax.host_memory`: XLA's and torch's per-step
buffers would otherwise come back as fresh pages every step); `--host_malloc ours` leaves
transformers on glibc's defaults, as it ships, `none` both. Each side reports its host
page faults per step. Each round times every side in turn (ours, each variant,
transformers), then each process's float32 matmul rate (a 2048^2 GEMM in XLA or torch),
so a shared machine's load hits all alike.

Per config it reports tokens/s (median over rounds), `ratio` (median of the per-round
ratios ours / transformers), model FLOP/s (`cwm_jax.train.flops`, the same count for
both sides) and each side's fraction of the matmul rate measured in the same rounds.
`products_only` bounds what faster non-product code could give: the FLOPs of every
matrix product our step runs (`flops.dot_flops`: the attention's recompute and masked
block edges included), the milliseconds they take at the measured GEMM rate, and
`ratio_bound`, the ratio a step made of nothing else would reach.

`--breakdown` adds, per side, where a step's time goes: forward + backward of each part
alone (an attention block and its kernel per window, the MLP, an RMSNorm, the head and
loss) and the AdamW update, in milliseconds, timed in alternating rounds after the step's
(fastest round per part), with the step rebuilt from its parts beside the measured one.
transformers' parts are its own modules and masks (`CwmAttention` on sdpa, `CwmMLP`, ...).

The configs are the issue's (first and last layer global, the middle two local):
  d256: d=256, 4 layers, 8/2 heads of 32, ffn 768, vocab 8192, T=512, B=4, window 128
  d512: d=512, 4 layers, 8/2 heads of 64, ffn 1536, vocab 8192, T=1024, B=2, window 256
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

CONFIGS = {
  "d256": dict(
    dim=256, n_heads=8, n_kv_heads=2, head_dim=32, ffn_dim=768, seq=512, batch=4, window=128
  ),
  "d512": dict(
    dim=512, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1536, seq=1024, batch=2, window=256
  ),
}
LR, WD = 1e-3, 0.1
HOST_MALLOC = ("ours", "both", "none")
WARM_STEPS = 3  # untimed steps after the first: the host heap grows to its steady size
SETTLE_S = 0.5  # idle gap before each timed call: the other side's threads stop spinning
EXECUTION = {"attention_impl": "auto", "scan_layers": False}  # chunk 0: resolve_chunk picks


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="d256,d512", help=f"comma-separated of {sorted(CONFIGS)}")
  p.add_argument("--steps", type=int, default=3, help="steps per side per round")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument(
    "--threads",
    type=int,
    default=os.cpu_count() or 1,
    help="torch threads (XLA:CPU uses every core)",
  )
  p.add_argument(
    "--execution", default=json.dumps(EXECUTION), help="JSON of Execution fields for our step"
  )
  p.add_argument(
    "--variant",
    action="append",
    default=[],
    help="JSON of Execution fields: another of our steps, timed alongside",
  )
  p.add_argument(
    "--host_malloc",
    choices=HOST_MALLOC,
    default="both",
    help="which sides keep freed host memory for reuse (`cwm_jax.host_memory`): "
    "both (the steps compared on equal terms), ours (as our programs run, "
    "transformers as it ships) or none",
  )
  p.add_argument(
    "--breakdown",
    action="store_true",
    help="also time each part of both steps alone (fwd+bwd), in milliseconds",
  )
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  return p.parse_args()


def model_config(name):
  from cwm_jax.model import ModelConfig, meta_layer_windows

  c = CONFIGS[name]
  return ModelConfig(
    vocab_size=8192,
    dim=c["dim"],
    n_layers=4,
    n_heads=c["n_heads"],
    n_kv_heads=c["n_kv_heads"],
    head_dim=c["head_dim"],
    ffn_dim=c["ffn_dim"],
    layer_windows=meta_layer_windows(4, c["window"], c["seq"]),
    global_window=c["seq"],
    max_seq_len=c["seq"],
  )


def batch_arrays(cfg, b, t):
  import numpy as np

  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    "segment_ids": np.ones((b, t), np.int32),
    "weights": np.ones((b, t), np.float32),
  }


def ours(cfg, execution, batch_np):
  """`run(n)`: n donated train steps of our jitted step; returns the last loss.
  `run.dot_flops`: the FLOPs of the step's matrix products (`flops.dot_flops`)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from cwm_jax.model import init_model
  from cwm_jax.train import flops
  from cwm_jax.train.step import make_train_step

  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0, execution), nnx.Param))
  holder = {
    "state": {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jnp.zeros((2,), jnp.uint32),
    }
  }
  step = jax.jit(make_train_step(cfg, tx, lambda s: LR, execution=execution), donate_argnums=0)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}

  def run(n):
    for _ in range(n):
      holder["state"], metrics = step(holder["state"], batch)
    return float(metrics["loss"])

  run.dot_flops = flops.dot_flops(jax.make_jaxpr(step)(holder["state"], batch))
  return run


def theirs(cfg, batch_np):
  import torch
  import transformers

  from cwm_jax.checkpoint.hf import config_to_hf

  torch.manual_seed(0)
  model = transformers.CwmForCausalLM(
    transformers.CwmConfig(**config_to_hf(cfg, dtype="float32"))
  ).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
  inputs = torch.as_tensor(batch_np["inputs"]).long()
  targets = torch.as_tensor(batch_np["targets"]).long()

  def run(n):
    for _ in range(n):
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    return float(loss)

  return run, model.config._attn_implementation


def our_parts(cfg, execution, b, t):
  """{part: call} for our step. A call runs one forward + backward of that part alone
  (gradients of its input and parameters), or one AdamW update, and waits for it."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from cwm_jax import kernels
  from cwm_jax.model import init_model
  from cwm_jax.model.attention import Attention
  from cwm_jax.model.layers import MLP, RMSNorm
  from cwm_jax.train.step import loss_total

  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.normal(0, 0.05, s), jnp.float32)
  n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  x, seg = arr(b, t, cfg.dim), jnp.ones((b, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def fwd_bwd(fn, *args):
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(args)))))
    return lambda: jax.block_until_ready(grad(*args))

  def module(m, call=lambda m, x: m(x)):
    graphdef, params = nnx.split(m)
    return fwd_bwd(lambda x, p: call(nnx.merge(graphdef, p), x), x, params)

  parts = {}
  attention = Attention(cfg, execution, nnx.Rngs(params=0))
  q, kk, v = arr(b, t, n, h), arr(b, t, k, h), arr(b, t, k, h)
  impl = kernels.resolve(execution.attention_impl, dtype=execution.compute_dtype)
  for w in sorted(set(cfg.layer_windows)):
    parts[f"attention_window{w}"] = module(attention, lambda m, x, w=w: m(x, pos, seg, w)[0])
    parts[f"attention_kernel_window{w}"] = fwd_bwd(
      lambda q, kk, v, w=w: kernels.attend(
        q, kk, v, seg, window=w, impl=impl, chunk=execution.attention_chunk
      ),
      q,
      kk,
      v,
    )
  parts["mlp"] = module(MLP(cfg.dim, cfg.ffn_dim, jnp.float32, nnx.Rngs(params=0)))
  parts["rms_norm"] = module(RMSNorm(cfg.dim, cfg.norm_eps, jnp.float32, nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0, execution), nnx.Param))
  batch = {key: jnp.asarray(v) for key, v in batch_arrays(cfg, b, t).items()}
  head = lambda hid, w: loss_total(_HeadOnly(hid, w, cfg), batch)[0]
  parts["head_and_loss"] = fwd_bwd(head, x, params["lm_head"])
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
  opt_state = tx.init(params)
  parts["adamw"] = lambda: jax.block_until_ready(update(params, opt_state, params))
  return parts


class _HeadOnly:
  """Stands in for the model in `loss_total`: fixed hidden states, the real head."""

  def __init__(self, hidden, head, cfg):
    self._hidden, self.lm_head, self.cfg = hidden, head, cfg

  def hidden(self, *_):
    return self._hidden

  def logits(self, h):
    import jax.numpy as jnp

    from cwm_jax.model.layers import dense

    return dense(h, self.lm_head, preferred_element_type=jnp.float32)


def their_parts(cfg, b, t):
  """{part: call} for transformers' step, the same parts as `our_parts`, from the modules
  and masks its `CwmModel.forward` uses (sdpa attention, causal / sliding-window masks)."""
  import torch
  import transformers
  from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
  from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

  from cwm_jax.checkpoint.hf import config_to_hf

  torch.manual_seed(0)
  model = transformers.CwmForCausalLM(
    transformers.CwmConfig(**config_to_hf(cfg, dtype="float32"))
  ).train()
  config, inner = model.config, model.model
  x = (torch.randn(b, t, cfg.dim) * 0.05).requires_grad_()
  pos = torch.arange(t)[None]
  embeddings = inner.rotary_emb(x, pos)
  mask_args = dict(
    config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos
  )
  masks = {
    "full_attention": create_causal_mask(**mask_args),
    "sliding_attention": create_sliding_window_causal_mask(**mask_args),
  }
  sdpa = ALL_ATTENTION_FUNCTIONS[config._attn_implementation]

  def fwd_bwd(fn, *inputs):
    def call():
      for p in (*model.parameters(), *inputs):
        p.grad = None
      fn(*inputs).pow(2).sum().backward()

    return call

  parts = {}
  qkv = [
    torch.randn(b, heads, t, cfg.head_dim).requires_grad_()
    for heads in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
  ]
  for w in sorted(set(cfg.layer_windows)):
    i = cfg.layer_windows.index(w)
    layer_type = config.layer_types[i]
    attention = inner.layers[i].self_attn
    parts[f"attention_window{w}"] = fwd_bwd(
      lambda x, a=attention, m=masks[layer_type]: a(x, embeddings, m)[0], x
    )
    parts[f"attention_kernel_window{w}"] = fwd_bwd(
      lambda q, k, v, a=attention, m=masks[layer_type]: sdpa(
        a, q, k, v, m, dropout=0.0, scaling=a.scaling, sliding_window=a.sliding_window
      )[0],
      *qkv,
    )
  parts["mlp"] = fwd_bwd(inner.layers[0].mlp, x)
  parts["rms_norm"] = fwd_bwd(inner.norm, x)
  targets = torch.as_tensor(batch_arrays(cfg, b, t)["targets"]).long().flatten()
  parts["head_and_loss"] = fwd_bwd(
    lambda x: torch.nn.functional.cross_entropy(model.lm_head(x).flatten(0, 1).float(), targets), x
  )
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
  for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
  grads = [p.grad for p in model.parameters()]

  def adamw():
    for p, g in zip(model.parameters(), grads):
      p.grad = g
    with torch.no_grad():
      opt.step()

  parts["adamw"] = adamw
  return parts


def step_from_parts(cfg, ms):
  """A step's milliseconds rebuilt from its parts: every layer's attention (by its
  window), MLP and two norms, the final norm, the head and loss, and AdamW."""
  layers = sum(
    ms[f"attention_window{w}"] + ms["mlp"] + 2 * ms["rms_norm"] for w in cfg.layer_windows
  )
  return round(layers + ms["rms_norm"] + ms["head_and_loss"] + ms["adamw"], 1)


def _worker(conn, side, name, execution_json, threads, breakdown, retain):
  """One side in its own process: builds its step (and with `breakdown` its parts), then
  answers ("run", n) with the seconds n steps took and the host page faults per step,
  ("matmul",) with its framework's GEMM FLOP/s and ("parts",) with each part's
  milliseconds (`_ms`). `retain`: keep freed host memory (`host_memory.retain`)."""
  import resource

  from cwm_jax import host_memory

  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
  ).strip()
  os.environ[host_memory.ENV] = "retain" if retain else "system"
  retained = host_memory.retain()  # before torch's or XLA's threads start
  import torch

  torch.set_num_threads(threads)
  cfg, c = model_config(name), CONFIGS[name]
  batch = batch_arrays(cfg, c["batch"], c["seq"])
  parts = {}
  if side == "ours":
    from cwm_jax.model import Execution

    execution = Execution(**json.loads(execution_json))
    run = ours(cfg, execution, batch)
    info = {"dot_flops_per_step": run.dot_flops}
    if breakdown:
      parts = our_parts(cfg, execution, c["batch"], c["seq"])
  else:
    run, attention = theirs(cfg, batch)
    info = {"attn_implementation": attention}
    if breakdown:
      parts = their_parts(cfg, c["batch"], c["seq"])
  start = time.perf_counter()
  run(1)
  info["first_step_s"] = time.perf_counter() - start
  run(WARM_STEPS)
  info["host_malloc"] = "retained" if retained else "system"
  for call in parts.values():  # compile and warm each part
    call()
    call()
  probe = matmul_rate(side)
  conn.send(info)
  while True:
    msg = conn.recv()
    if msg[0] == "run":
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      run(msg[1])
      seconds = time.perf_counter() - start
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
      conn.send((seconds, faults / msg[1]))
    elif msg[0] == "matmul":
      conn.send(probe())
    elif msg[0] == "parts":
      conn.send({name: _ms(call) for name, call in parts.items()})
    else:
      return


def _ms(call, repeats=2):
  """Milliseconds of the fastest of `repeats` back-to-back calls (the first part timed
  after an idle gap otherwise pays for waking the thread pool)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return 1000 * min(times)


def matmul_rate(side, n=2048, reps=3):
  """`probe()` -> float32 GEMM FLOP/s of an n x n product in XLA ("ours") or torch, best
  of `reps`."""
  import numpy as np

  a_np = np.random.default_rng(1).normal(size=(n, n)).astype(np.float32)
  if side == "ours":
    import jax
    import jax.numpy as jnp

    a, mm = jnp.asarray(a_np), jax.jit(lambda a: a @ a)
    call = lambda: mm(a).block_until_ready()
  else:
    import torch

    a = torch.from_numpy(a_np)
    call = lambda: a @ a
  call()

  def probe():
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      call()
      times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)

  return probe


def run_config(name, a):
  from cwm_jax.model import Execution
  from cwm_jax.train import flops

  cfg, c = model_config(name), CONFIGS[name]
  b, t = c["batch"], c["seq"]
  base = Execution(**json.loads(a.execution))
  executions = [base] + [base.replace(**json.loads(v)) for v in a.variant]
  ctx = multiprocessing.get_context("spawn")
  workers = []
  sides = [("ours", e) for e in executions] + [("transformers", None)]
  timed_parts = (0, len(sides) - 1)  # ours (the base execution) and transformers
  for i, (side, e) in enumerate(sides):
    parent, child = ctx.Pipe()
    retain = a.host_malloc == "both" or (a.host_malloc == "ours" and side == "ours")
    proc = ctx.Process(
      target=_worker,
      daemon=True,
      args=(
        child,
        side,
        name,
        json.dumps(vars(e)) if e else "",
        a.threads,
        a.breakdown and i in timed_parts,
        retain,
      ),
    )
    proc.start()
    workers.append((parent, proc, parent.recv()))  # one side builds and compiles at a time
  tokens = a.steps * b * t
  rates = [[] for _ in workers]
  faults = [[] for _ in workers]
  mm = [[] for _ in workers]
  for _ in range(a.rounds):
    for i, (conn, _, _) in enumerate(workers):
      time.sleep(SETTLE_S)
      conn.send(("run", a.steps))
      seconds, step_faults = conn.recv()
      rates[i].append(tokens / seconds)
      faults[i].append(step_faults)
    for i, (conn, _, _) in enumerate(workers):
      time.sleep(SETTLE_S)
      conn.send(("matmul",))
      mm[i].append(conn.recv())
  parts = [[] for _ in workers]
  for _ in range(a.rounds if a.breakdown else 0):
    for i in timed_parts:
      time.sleep(SETTLE_S)
      workers[i][0].send(("parts",))
      parts[i].append(workers[i][0].recv())
  for conn, proc, _ in workers:
    conn.send(("stop",))
    proc.join()
  per_token = flops.flops_per_token(cfg, t)
  med = statistics.median

  def side(i):
    rs = rates[i]
    return {
      "tokens_per_s": round(med(rs), 1),
      "rounds": [round(r, 1) for r in rs],
      "model_gflop_per_s": round(med(rs) * per_token / 1e9, 2),
      "matmul_gflop_per_s": round(med(mm[i]) / 1e9, 1),
      "fraction_of_matmul_rate": round(med([r * per_token / m for r, m in zip(rs, mm[i])]), 3),
      "host_malloc": workers[i][2]["host_malloc"],
      "page_faults_per_step": round(med(faults[i])),
    }

  ratio = lambda i: round(med([o / r for o, r in zip(rates[i], rates[-1])]), 3)

  def products_only(i):
    """The step's matrix products at the GEMM rate measured in the same rounds, and the
    ratio a step of only those would reach against transformers' measured steps."""
    dots = workers[i][2]["dot_flops_per_step"]
    floor_s = [dots / m for m in mm[i]]
    return {
      "dot_gflop_per_step": round(dots / 1e9, 2),
      "ms_at_matmul_rate": round(1000 * med(floor_s), 1),
      "ratio_bound": round(med([b * t / r / f for r, f in zip(rates[-1], floor_s)]), 3),
    }

  out = {
    "config": name,
    **c,
    "params": cfg.param_count(),
    "layer_windows": cfg.layer_windows,
    "ratio": ratio(0),
    "ours": {
      **side(0),
      "first_step_s": round(workers[0][2]["first_step_s"], 2),
      "products_only": products_only(0),
      "execution": vars(executions[0]),
    },
    "transformers": {**workers[-1][2], **side(-1)},
    "flops_per_token": per_token,
  }
  out["variants"] = [
    {"execution": vars(e), **side(i), "ratio": ratio(i), "products_only": products_only(i)}
    for i, e in enumerate(executions[1:], 1)
  ]
  if a.breakdown:
    out["breakdown_ms"] = {
      key: _fastest(cfg, parts[i], b * t / med(rates[i]))
      for key, i in (("ours", 0), ("transformers", -1))
    }
  return out


def _fastest(cfg, rounds, step_s):
  """Per part, its fastest round in milliseconds; the step rebuilt from them and the
  step as measured (median round)."""
  ms = {name: round(min(r[name] for r in rounds), 1) for name in rounds[0]}
  return {
    **ms,
    "step_from_parts": step_from_parts(cfg, ms),
    "step_measured": round(1000 * step_s, 1),
  }


def main():
  a = _args()
  results = [run_config(name, a) for name in a.configs.split(",")]
  ratios = [r["ratio"] for r in results]
  out = {
    "threads": a.threads,
    "steps_per_round": a.steps,
    "rounds": a.rounds,
    "median_ratio": round(statistics.median(ratios), 3),
    "min_ratio": min(ratios),
    "configs": results,
  }
  print(json.dumps(out))
  if a.save:
    print("saved", results_io.save("train_step", out), file=sys.stderr)


if __name__ == "__main__":
  main()
