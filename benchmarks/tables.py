"""Renders the docs' generated tables (`DOCS`: docs/performance.md, docs/planning.md) from the
latest benchmark records.

  python benchmarks/tables.py            # rewrite the generated blocks of every doc in DOCS
  python benchmarks/tables.py --check    # exit 1 if a committed doc differs from its output

Each generated block sits between `<!-- tables:NAME -->` and `<!-- /tables:NAME -->` in a
doc and is rendered from the newest record under `benchmarks/results/NAME/` (`FROM_RECORD`:
a block that reads another benchmark's record, and which field)
(`results_io.latest(NAME)["result"]`, what `python benchmarks/NAME.py --save` wrote), followed
by a line naming that record: its file, date, commit and machine. A block of `SERIES`
(`train_loop`: one row per device count) renders the newest record of each configuration and
names each. Records migrated from the doc itself (`migrated_from: "docs/performance.md"`: figures
from a machine not at hand or a run too long to repeat) have no machine; their
`machine_described` says what the text named. Everything outside the markers is left as
written. A marker without a renderer or without a record is an error, so
every generated figure has one home: its record.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "performance.md")
# Every guide may hold generated blocks; performance.md holds most.
DOCS = (DOC, os.path.join(ROOT, "docs", "planning.md"))
BLOCK = re.compile(r"(<!-- tables:(\w+) -->\n)(.*?)(<!-- /tables:\2 -->)", re.S)


def _load_results_io():
  """benchmarks/results_io.py by path: this file is also loaded by path (the tests), and
  benchmarks/ on sys.path would shadow modules such as `tables` for everything after."""
  spec = importlib.util.spec_from_file_location("results_io", os.path.join(HERE, "results_io.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


results_io = _load_results_io()
RESULTS = results_io.RESULTS


def _mb(n: float) -> str:
  return f"{n / 1e6:,.0f}"


def attention_memory(r: dict) -> str:
  """Compiled temporaries of the chunked and dense train steps at each T, and per token."""
  rows = ["| T | chunked temp (MB) | per token (kB) | dense temp (MB) |", "|---|---|---|---|"]
  dense = r.get("dense_temp_bytes", {})
  for t, b in sorted(r["chunked_temp_bytes"].items(), key=lambda kv: int(kv[0])):
    d = _mb(dense[t]) if t in dense else ""
    rows.append(f"| {int(t):,} | {_mb(b)} | {b / int(t) / 1e3:,.1f} | {d} |")
  dense_exponent = r.get("dense_growth_exponent")
  dense_text = f" (dense {dense_exponent})" if dense_exponent is not None else ""
  return (
    f"Model: {r['model']}. `growth_exponent` {r['growth_exponent']}{dense_text}.\n\n"
    + "\n".join(rows)
    + "\n"
  )


def checkpoint_io(r: dict) -> str:
  """Save / restore rates per target and the train step with an async save in flight."""
  rows = [
    "| target | save MB/s | restore MB/s | step time, save in flight / none | "
    "blocking part of a save (s) | restored equal |",
    "|---|---|---|---|---|---|",
  ]
  flight = r["train"]["save_in_flight"]
  for target in sorted(r["io"], key=lambda t: (t != "local", t)):  # records sort their keys
    io, f = r["io"][target], flight.get(target, {})
    rows.append(
      f"| {target} | {io['save_mb_s']} | {io['restore_mb_s']} | "
      f"{f.get('step_time_ratio', '')}x | {f.get('save_blocking_s', '')} | "
      f"{io['restored_equal']} |"
    )
  return (
    f"State {r['state_mb']} MB ({r['model']['params']:,} parameters with AdamW), "
    f"{r['cpu_count']} CPU cores, {r['io_rounds']} rounds.\n\n" + "\n".join(rows) + "\n"
  )


def traces(r: dict) -> str:
  """Sandboxed trace throughput, the traces' sizes and the sandbox's fixed cost."""
  statuses = ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items()))
  rows = [
    "| calls (statuses) | traces/s | seconds | frames mean / max | trace bytes mean | "
    "empty `run_python` (s) | namespaces |",
    "|---|---|---|---|---|---|---|",
    f"| {r['calls']} ({statuses}) | {r['traces_per_s']} | {r['seconds']} | "
    f"{r['frames_mean']} / {r['frames_max']} | {r['trace_bytes_mean']:,} | "
    f"{r['run_python_empty_s']} | {r['namespaces']} |",
  ]
  return "\n".join(rows) + "\n"


def _span(v) -> str:
  """A figure or a list of them (the runs of one measurement), as `a / b`."""
  if isinstance(v, list):
    return " / ".join(f"{x:,}" for x in v)
  return f"{v:,}" if isinstance(v, (int, float)) else str(v)


def _pct(x: float) -> str:
  return f"{100 * x:.2f}".rstrip("0").rstrip(".") + "%"


# Records sort their keys; these put a result's named parts back in reading order.
STAGES = ("pretrain", "midtrain", "sft")
PARTS = (
  "attention block, local window",
  "its kernel alone (local)",
  "attention block, global",
  "its kernel alone (global)",
  "MLP",
  "RMSNorm",
  "head and loss",
  "AdamW",
  "step from parts",
  "step measured",
)


def train_step(r: dict) -> str:
  """Tokens/s ours vs transformers per config, the GEMM rates and the products-only bound."""
  rows = [
    "| config | ratio | tokens/s ours / transformers | GEMM GFLOP/s ours / transformers | "
    "fraction of GEMM rate ours / transformers | `ratio_bound` | first step ours (s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for c in r["configs"]:
    o, t = c["ours"], c["transformers"]
    rows.append(
      f"| {c['config']} | {c['ratio']} | {o['tokens_per_s']:,} / {t['tokens_per_s']:,} | "
      f"{o['matmul_gflop_per_s']} / {t['matmul_gflop_per_s']} | "
      f"{o['fraction_of_matmul_rate']} / {t['fraction_of_matmul_rate']} | "
      f"{o['products_only']['ratio_bound']} | {o['first_step_s']} |"
    )
  return (
    f"Median ratio {r['median_ratio']} (lowest config {r['min_ratio']}); {r['rounds']} rounds x "
    f"{r['steps_per_round']} steps, {r['threads']} threads.\n\n" + "\n".join(rows) + "\n"
  )


def train_step_breakdown(r: dict) -> str:
  """Per-part milliseconds of both steps, fastest round per part."""
  rows = [
    "| part (ms) | d256 ours | d256 transformers | d512 ours | d512 transformers |",
    "|---|---|---|---|---|",
  ]
  for part in sorted(r["ms"], key=lambda p: PARTS.index(p) if p in PARTS else len(PARTS)):
    v = r["ms"][part]
    rows.append(f"| {part} | {' | '.join(str(x) for c in ('d256', 'd512') for x in v[c])} |")
  g, ratio = r["gemm_gflops"], r["step_ratio"]
  return (
    f"`{r['command']}`, {r['rounds']} rounds x {r['steps']} steps; GEMM GFLOP/s XLA "
    f"{_span(g['xla'])}, torch {_span(g['torch'])}; step ratios d256 {ratio['d256']}, "
    f"d512 {ratio['d512']}.\n\n" + "\n".join(rows) + "\n"
  )


def sampler(r: dict) -> str:
  """Greedy decode tokens/s ours vs transformers per batch, its split, the 32B cache."""
  d = r["decode"]
  rows = [
    "| batch | ratio | tokens/s ours / transformers | one-token call (s) ours / transformers | "
    "decode step (ms) ours / transformers | steps ratio | our compile (s) | first tokens agree |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for run in sorted(d["runs"], key=lambda x: -x["batch"]):
    tok, one, step = run["tokens_per_s"], run["one_token_call_s"], run.get("decode_step_ms", {})
    rows.append(
      f"| {run['batch']} | {run['ratio']} | {tok['ours']:,} / {tok['transformers']:,} | "
      f"{one['ours']} / {one['transformers']} | {step.get('ours', '')} / "
      f"{step.get('transformers', '')} | {run.get('decode_steps_ratio', '')} | "
      f"{run['ours_compile_s']} | {run['first_tokens_agree']} |"
    )
    prompt, new, rounds = run["prompt"], run["new"], run["rounds"]
  return (
    f"{d['config']}, {d['dtype']}, {d['model_params']:,} parameters, prompt {prompt}, {new} new "
    f"tokens, {rounds} rounds, {d['threads']} threads; transformers on "
    f"`{d['transformers_attn_implementation']}`. The 32B cache at 131072 tokens (bf16, batch 1): "
    f"{r['cwm32b_cache_gib_bf16_b1_131072']} GiB with ring buffers, "
    f"{r['cwm32b_cache_gib_without_ring_buffers']} GiB without.\n\n" + "\n".join(rows) + "\n"
  )


def sampler_compile(r: dict) -> str:
  """The sampler's compile seconds per depth."""
  return (
    "; ".join(f"{c['compile_s']} s at {c['n_layers']} layers ({c['form']})" for c in r["compile"])
    + ".\n"
  )


def convert(r: dict) -> str:
  """Conversion rates and peak RSS against the largest tensor, each direction."""
  c = r["config"]
  rows = [
    "| conversion | GB/s | seconds | peak RSS (GB) | peak RSS / largest tensor | "
    "above the import baseline / largest tensor |",
    "|---|---|---|---|---|---|",
  ]
  for name, v in r["conversions"].items():
    rows.append(
      f"| {name} | {v['gb_per_s']} | {v['seconds']} | {v['peak_rss_gb']} | "
      f"{v['peak_rss_over_largest_tensor']}x | {v['peak_minus_baseline_over_largest_tensor']}x |"
    )
  return (
    f"Synthetic {c['dtype']} checkpoint of {r['checkpoint_gb']} GB (dim {c['dim']}, "
    f"{c['n_layers']} layers, vocab {c['vocab']:,}); largest tensor {r['largest_tensor_gb']} GB, "
    f"largest stacked leaf (one weight over all layers) {r['largest_stacked_leaf_gb']} GB."
    "\n\n" + "\n".join(rows) + "\n"
  )


def train_loop(results: list[dict]) -> str:
  """The smoke loop's throughput, one row per device count."""
  rows = [
    "| devices (mesh) | tokens/s | step (ms) | MFU | first step (s) | batch x seq | steps | "
    "load (1 min) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(results, key=lambda r: r["devices"]):
    rows.append(
      f"| {r['devices']} ({r['mesh']}) | {r['tokens_per_sec']:,} | {r['step_time_ms']} | "
      f"{r['mfu']:.4f} | {r['first_step_s']} | {r['batch_size']} x {r['seq_len']} | "
      f"{r['steps']} | {r['load_avg_1m']:.1f} |"
    )
  return "\n".join(rows) + "\n"


def main_job(r: dict) -> str:
  """The smoke schedule's time, losses and held-out trace NLL."""
  stages = sorted(r["loss_first_last"], key=lambda s: STAGES.index(s) if s in STAGES else 9)
  loss = "; ".join(
    f"{s} {r['loss_first_last'][s][0]} -> {r['loss_first_last'][s][1]}" for s in stages
  )
  h, rt = r["held_out"], r["repo_traces"]
  mid = rt["after_midtrain"]
  return (
    f"`{r['command']}`: about {r['minutes']} minutes ({r['quiet_run_s']} s in a quiet run). "
    f"Loss, first step to last: {loss}. Held-out teacher-forced trace NLL ({h['calls']} calls): "
    f"{h['final_nll']} nats/token ({_pct(h['final_token_accuracy'])} token accuracy), untrained "
    f"{h['untrained_nll']}. With `traces=repo` ({rt['records']} records, built in "
    f"~{rt['build_s']} s): after midtrain {mid['shipped']['nll']} "
    f"({_pct(mid['shipped']['token_accuracy'])}) with the shipped programs against "
    f"{mid['repo']['nll']} ({_pct(mid['repo']['token_accuracy'])}) with repository traces; "
    f"after SFT {rt['after_sft_nll']['shipped']} against {rt['after_sft_nll']['repo']}.\n"
  )


def attention_flops(r: dict) -> str:
  return (
    f"T={r['seq_len']:,}, W={r['window']:,}: `chunked_over_ideal` {r['chunked_over_ideal']} "
    f"(target <= {r['target_chunked_over_ideal']}), `dense_over_ideal` {r['dense_over_ideal']}.\n"
  )


def context_parallel(r: dict) -> str:
  return (
    f"T={r['seq_len']:,}, {r['devices']} devices: `local_over_halo_bound` "
    f"{r['local_over_halo_bound']} (target <= {r['target']}).\n"
  )


def compile_time(r: dict) -> str:
  return (
    f"The 32B train step on 64 simulated devices compiles in {r['train_step_32b_64_devices_s']} s; "
    f"the 32B forward in {r['forward_32b_scanned_s']} s scanned against "
    f"{r['forward_32b_unrolled_s']} s unrolled.\n"
  )


def data_pipeline(r: dict) -> str:
  """Packed tokens/s per worker, padding and runs per row, per corpus and length."""
  rows = [
    "| corpus@length | tokens/s per worker | padding | runs per row, mean / max |",
    "|---|---|---|---|",
  ]
  for k in sorted(r["packing"], key=lambda k: (k.split("@")[0], len(k))):  # code@8k first
    v = r["packing"][k]
    runs = r["runs_per_row"][k]
    rows.append(
      f"| {k} | {v['tokens_per_s_per_worker']:,} | {v['padding']} | "
      f"{runs['mean']} / {runs['max']} |"
    )
  return (
    "\n".join(rows) + f"\n\nRows needing cuDNN's fallback at M=64: {r['rows_over_64_segments']} "
    f"of {r['rows']}.\n"
  )


def trace_sources(r: dict) -> str:
  """Trace-corpus throughput and drop table of both sources."""
  rt, fn = r["repo_traces"], r["functions"]
  drops = ", ".join(f"{k} {_pct(v)}" for k, v in rt["dropped"].items())
  heapq = ", ".join(f"{k} {_pct(v)}" for k, v in rt["with_test_heapq_dropped"].items())
  rows = [
    "| source | calls | traces/s local (per worker) | traces/s DirectRunner (per worker) | kept |",
    "|---|---|---|---|---|",
    f"| `repo_traces` ({rt['modules']}) | {rt['calls']:,} | {rt['local']['traces_per_s']} "
    f"({rt['local']['per_worker']}) | {rt['direct_runner']['traces_per_s']} "
    f"({rt['direct_runner']['per_worker']}) | {_pct(rt['kept'])} |",
    f"| `functions` | {fn['calls']} | {fn['local']['traces_per_s']} ({fn['local']['per_worker']})"
    f" | {fn['direct_runner']['traces_per_s']} | {_pct(fn['kept'])} |",
  ]
  return (
    f"{r['workers']} workers, load ~{r['load_avg']} from other jobs.\n\n"
    + "\n".join(rows)
    + f"\n\n`repo_traces` dropped: {drops} (DirectRunner start ~{rt['direct_runner']['start_s']}"
    f" s); with `test_heapq` added: {heapq}.\n"
  )


def rl_toy(r: dict) -> str:
  return (
    f"Greedy pass rate on the digit task (chance 1/{round(1 / r['chance'])}): "
    f"{_pct(r['pass_rate_before'])} before, {_pct(r['pass_rate_after'])} after {r['steps']} GRPO "
    "updates.\n"
  )


def rl_chain(r: dict) -> str:
  """Held-out pass rates before and after RL on output prediction, with their SE."""
  rows = [
    "| held-out tasks | pass@1 | before | after | improvement | SE | improvement / SE |",
    "|---|---|---|---|---|---|---|",
  ]
  for label, pre in (("sampled, T=" + str(r["temperature"]), ""), ("greedy", "greedy_")):
    gain, se = r[f"{pre}improvement"], r[f"{pre}improvement_se"]
    rows.append(
      f"| {r['held_out_tasks']:,} | {label} | {r[f'{pre}held_out_before']:.3f} | "
      f"{r[f'{pre}held_out_after']:.3f} | {gain:+.3f} | {se:.4f} | {gain / se:.1f} |"
    )
  a, b = r["greedy_answers_before"], r["greedy_answers_after"]
  return (
    "\n".join(rows)
    + f"\n\n{r['rl_steps']} RL updates (group {r['group_size']}, batch {r['batch_size']}) on "
    f"{r['train_tasks']:,} training tasks after {r['warmup_steps']} warm-up steps; "
    f"{r['updates_skipped']} updates skipped (no reward spread); wall {r['wall_s']} s. Distinct "
    f"greedy answers over the held-out set: {a['distinct']} before, {b['distinct']} after.\n"
  )


def rl_disagg(r: dict) -> str:
  """Colocated against disaggregated RL: throughput and the overlap of sampling and update."""
  rows = [
    "| mode | updates/s | rollout tokens/s | wall per update (s) | sampling per update (s) |",
    "|---|---|---|---|---|",
  ]
  for mode in ("colocated", "disagg"):
    m = r[mode]
    rows.append(
      f"| {mode} | {m['updates_per_s']:.4f} | {m['rollout_tokens_per_s']:.1f} | "
      f"{m['wall_per_update_s']:.2f} | {m['sampling_per_update_s']:.2f} |"
    )
  return (
    "\n".join(rows)
    + f"\n\n{r['setup']}; means of {r['rounds']} alternating rounds of {r['steps']} steps. "
    f"Updates/s ratio {r['updates_per_s_ratio']:.2f}; overlap ratio (disaggregated wall per "
    f"update over colocated) {r['overlap_ratio']:.3f}; "
    f"update hidden behind sampling: {str(r['hidden_update']).lower()}.\n"
  )


def gpu_mfu(r: dict) -> str:
  """MFU per layout on one GPU, and where a step's kernel time goes."""
  rows = ["| layout | MFU | step (ms) | tokens/s | peak GiB |", "|---|---|---|---|---|"]
  for run in r["runs"]:
    rows.append(
      f"| {run['layout']} | {_span(run.get('mfu', ''))} | {_span(run.get('step_ms', ''))} | "
      f"{_span(run.get('tokens_per_s', ''))} | {run.get('peak_gib', '')} |"
    )
  first = r["runs"][0]
  p = r["profile_ms_per_step"]
  return (
    f"{r['model']}, T={r['seq_len']:,}, attention `{r['attention']}`; target MFU "
    f"{r['target_mfu']}. Runs separated by ` / `.\n\n" + "\n".join(rows) + "\n\n"
    f"First runs: {_span(first['of_matmul_rate'])} of the {_span(first['matmul_tflops'])} "
    f"TFLOP/s bf16 matmul rate measured in the same process; first step (compile) "
    f"{r['first_step_s'][0]}-{r['first_step_s'][1]} s. cuDNN's `compute_dot_do_o` at M=64: "
    f"{r['compute_dot_do_o_ms_at_m64']} ms a step. Kernel ms per step (batch {p['batch']}, "
    f"M={p['max_segments']}): matmuls {p['matmuls']}, elementwise and other "
    f"{p['elementwise_and_other']}, attention {p['attention']}, reductions {p['reductions']}.\n"
  )


def gpu_parity(r: dict) -> str:
  g, o, gr = r["gpu_check"], r["output_max_err"], r["grad_rel_err"]
  tests = ", ".join(f"`{t}`" for t in g["tests_passed"])
  return (
    f"`gpu_check.sh` exit {g['exit']} in {g['seconds'][0]}-{g['seconds'][1]} s; GPU tests passed: "
    f"{tests}. `gpu_parity.py`: {r['cases_ok']} of {r['cases']} cases `ok`; largest output "
    f"error cuDNN {o['cudnn'][0]}-{o['cudnn'][1]} against the bf16 reference's own "
    f"{o['bf16_reference'][0]}-{o['bf16_reference'][1]}; gradients (relative to their largest "
    f"entry) {gr['cudnn'][0]}-{gr['cudnn'][1]} against "
    f"{gr['bf16_reference'][0]}-{gr['bf16_reference'][1]}.\n"
  )


def gpu_plan(r: dict) -> str:
  """Deviceless GPU compiles: cwm_1b temp memory per attention, cwm_32b on 64 GPUs."""
  one, big = r["cwm_1b"], r["cwm_32b_pretrain"]
  impls = ("cudnn", "chunked", "reference")
  rows = ["| T | " + " | ".join(f"`{i}`" for i in impls) + " |", "|---|---|---|---|"]
  for t, v in sorted(one["temp_gib"].items(), key=lambda kv: int(kv[0])):
    cells = [f"{v[i]} GiB" if i in v else "" for i in impls]
    rows.append(f"| {t} | " + " | ".join(cells) + " |")
  a = big["grad_accum_32"]
  return (
    f"`{one['command']}`: the `cwm_1b` train step (B={one['batch']}, bf16, f32 params + AdamW "
    f"{one['arguments_gib']} GiB of arguments, no remat), temp memory per GPU ({one['gpu_memory_gib']}"
    f" GiB each; `cudnn` at 8192 compiled in {one['cudnn_compile_s_8192']} s):\n\n"
    + "\n".join(rows)
    + f"\n\n`cwm_32b` pretrain (T={big['seq_len']}, batch {big['batch']}) on `--gpus {big['gpus']}`"
    f" ({big['mesh']}, remat {big['remat']}): with `grad_accum=1` {big['grad_accum_1_gib']} GiB "
    f"per GPU; with `grad_accum=32` {a['total_gib']} GiB ({a['arguments_gib']} arguments + "
    f"{a['temp_gib']} temporaries; `chunked`: {a['chunked_total_gib']} GiB), compiled in "
    f"{a['compile_s']} s on 2 CPU cores; {a['step_s_at_100pct_mfu']} s per step at 100% MFU.\n"
  )


TARGETS = {"pretrain": 0.70, "sft": 0.65, "midtrain": 0.60, "rl": 0.55}  # issue 43's MFU targets
PLAN_STAGES = ("pretrain", "midtrain", "sft", "rl")


def _layout(mesh: dict, accum: int, remat: str, extra: str = "") -> str:
  axes = ", ".join(f"{a}={n}" for a, n in mesh.items() if n > 1)
  return f"{axes}{extra}; accum {accum} ({remat})"


def _plan_key(key: str) -> tuple:
  stage, _, rest = key.partition("@")
  slice_name, _, variant = rest.partition(",")
  return PLAN_STAGES.index(stage) if stage in PLAN_STAGES else 9, slice_name, variant


def _plans_with(r: dict, field: str):
  """(plan, its first three cells: stage (context), slice, layout) of each plan in `r` with
  `field`, in stage order."""
  for key in sorted(r, key=_plan_key):
    p = r[key]
    if field in p:
      lead = (
        f"| {key.split('@')[0]} ({p['seq_len'] // 1024}k) | {_plan_key(key)[1]} | "
        f"{_layout(p['mesh'], p['grad_accum'], p['remat'])} | "
      )
      yield p, lead


def tpu_plan(r: dict) -> str:
  """The cost-model estimates of each planned stage x slice (and layout variant)."""
  rows = [
    "| stage | slice | layout (remat) | est. MFU | est. step s | tokens/step | days (stage budget) "
    "| GiB/chip | matmul / attention kernels / other (s) | method |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for p, lead in _plans_with(r, "estimated_mfu"):
    kinds = p["estimated_seconds_by_kind"]
    split = " / ".join(f"{kinds.get(k, 0.0):.1f}" for k in ("matmul", "attention_kernels", "other"))
    method = "roofline fallback" if p["estimate_method"].startswith("roofline") else "cost model"
    rows.append(
      f"{lead}{p['estimated_mfu']:.3f} | "
      f"{p['estimated_step_seconds']:.1f} | {p['tokens_per_step'] / 1e6:.1f}M | "
      f"{p['days_at_estimated_mfu']:.0f} | {p['peak_gb_per_device']:.1f} | {split} | {method} |"
    )
  return "\n".join(rows) + "\n"


def tpu_memory(r: dict) -> str:
  """Memory per chip, step time at 50% MFU and compile time of each planned stage x slice."""
  rows = [
    "| stage | slice | layout (remat) | GiB per chip: args + temp = total | peak program (GiB) "
    "| tokens/step | step @50% MFU (s) | days @50% MFU | compile (s) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for p, lead in _plans_with(r, "total_gb_per_device"):
    rows.append(
      f"{lead}{p['argument_gb_per_device']:.2f} + "
      f"{p['temp_gb_per_device']:.2f} = **{p['total_gb_per_device']:.1f}** of {p['hbm_gb']:.0f} | "
      f"{p['peak_program']} ({p['peak_gb_per_device']:.1f}) | {p['tokens_per_step'] / 1e6:.1f}M | "
      f"{p['step_seconds_at_50pct_mfu']:.1f} | {p['days_at_50pct_mfu']:.1f} | "
      f"{p['compile_seconds']:.0f} |"
    )
  return "\n".join(rows) + "\n"


def tpu_rollout(plans: dict) -> str:
  """The rollout replicas of each disaggregated RL plan: mesh, GiB per chip, weight sync."""
  rows = [
    "| slice | processes | trainer chips | rollout mesh (rows at once) | prefill / decode / extend "
    "GiB per chip | KV cache GiB per chip | weight sync GB (per rollout chip) |",
    "|---|---|---|---|---|---|---|",
  ]
  for key in sorted(plans, key=_plan_key):
    _, slice_name, _ = _plan_key(key)
    p = ((plans[key] or {}).get("stages") or {}).get(key.partition("@")[0], {})
    ro = p.get("rollout")
    if not ro:
      continue
    mesh = ", ".join(f"{a}={n}" for a, n in ro["mesh"].items() if n > 1)
    gib = " / ".join(f"{ro[k]['total_gb_per_device']:.1f}" for k in ("prefill", "decode", "extend"))
    rows.append(
      f"| {slice_name} | {p['processes']} | {p['devices']} | {mesh} ({ro['prefill']['rows']}) | "
      f"{gib} | {ro['prefill']['cache_gb_per_device']:.2f} | {p['weight_sync_gb']:.0f} "
      f"({p['weight_sync_bytes_per_rollout_device'] / 1e9:.2f}) |"
    )
  return "\n".join(rows) + "\n"


def tpu_bounds(bounds: dict) -> str:
  """What the splash kernels and the matmuls alone allow, per stage x slice (no compile)."""
  rows = [
    "| stage | slice | layout (remat) | target | attention FLOPs share | kernels s "
    "| matmuls at peak s | MFU bound |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for key in sorted(bounds, key=_plan_key):
    b = bounds[key]
    stage, slice_name = key.split("@")[0], key.split("@")[1]
    rows.append(
      f"| {stage} | {slice_name} | {_layout(b['mesh'], b['grad_accum'], b['remat'])} | "
      f"{TARGETS.get(stage, 0):.2f} | {b['attention_flops_share']:.0%} | "
      f"{b['attention_kernel_seconds']:.1f} | {b['matmul_seconds_at_peak']:.1f} | "
      f"{b['mfu_bound_kernels_and_matmuls']:.2f} |"
    )
  return "\n".join(rows) + "\n"


RENDERERS = {
  "tpu_plan": tpu_plan,
  "tpu_bounds": tpu_bounds,
  "tpu_memory": tpu_memory,
  "tpu_rollout": tpu_rollout,
  "attention_memory": attention_memory,
  "checkpoint_io": checkpoint_io,
  "traces": traces,
  "train_step": train_step,
  "train_step_breakdown": train_step_breakdown,
  "sampler": sampler,
  "sampler_compile": sampler_compile,
  "convert": convert,
  "train_loop": train_loop,
  "main_job": main_job,
  "attention_flops": attention_flops,
  "context_parallel": context_parallel,
  "compile_time": compile_time,
  "data_pipeline": data_pipeline,
  "trace_sources": trace_sources,
  "rl_toy": rl_toy,
  "rl_chain": rl_chain,
  "rl_disagg": rl_disagg,
  "gpu_mfu": gpu_mfu,
  "gpu_parity": gpu_parity,
  "gpu_plan": gpu_plan,
}
# Blocks rendered from the newest record of each configuration (key of the result), not
# only the newest record: their renderer takes the list of results.
SERIES = {"train_loop": lambda r: (r["devices"], r["mesh"])}
# Blocks rendered from another benchmark's record, and the record's field they read.
FROM_RECORD = {
  "tpu_bounds": ("tpu_plan", "analytic_bounds"),
  "tpu_memory": ("tpu_plan", "result"),
  "tpu_rollout": ("tpu_plan", "plans"),
}


def source_line(name: str, rec: dict) -> str:
  """Where a block's figures come from: the record's file, date, commit and machine."""
  path = f"benchmarks/results/{name}/{rec['date'].replace(':', '')}.json"
  commit = (rec.get("commit") or "unknown")[:10]
  machine = rec.get("machine")
  if machine:
    accelerator = f", {machine['accelerator']}" if machine.get("accelerator") else ""
    host = f"{machine['cpu']}, {machine['cpu_count']} cores{accelerator}"
  elif rec.get("machine_described"):
    host = f"not recorded; the doc described it as {rec['machine_described']}"
  else:
    host = "not recorded"
  dirty = " (with uncommitted changes)" if rec.get("dirty") else ""
  line = f"Source: `{path}`, {rec['date']}, commit `{commit}`{dirty}; machine: {host}."
  if rec.get("migrated_from", "").endswith(".md"):
    line += (
      f" Migrated from `{rec['migrated_from']}` (date and commit: the commit that wrote the"
      " figures)."
    )
  elif rec.get("migrated_from"):
    line += f" Migrated from `{rec['migrated_from']}` (date and commit: the commit that added it)."
  return line + "\n"


def series(name: str, results: str = RESULTS) -> list[dict]:
  """The newest record of each configuration (`SERIES[name]` of its result), oldest first."""
  newest = {}
  for path in sorted(glob.glob(os.path.join(results, name, "*.json"))):
    with open(path) as f:
      rec = json.load(f)
    newest[SERIES[name](rec["result"])] = rec
  return sorted(newest.values(), key=lambda rec: rec["date"])


def render(text: str, results: str = RESULTS) -> str:
  """`text` with every generated block rendered afresh from its newest record."""

  def block(m):
    block_name = m.group(2)
    if block_name not in RENDERERS:
      raise ValueError(f"tables:{block_name} has no renderer in benchmarks/tables.py")
    name, field = FROM_RECORD.get(block_name, (block_name, "result"))
    try:
      rec = results_io.latest(name, results)
    except FileNotFoundError as e:
      raise ValueError(f"tables:{name} needs a record: {e}") from None
    if name in SERIES:
      recs = series(name, results)
      body = RENDERERS[name]([r["result"] for r in recs])
      return m.group(1) + body + "\n" + "".join(source_line(name, r) for r in recs) + m.group(4)
    body = RENDERERS[block_name](rec[field])
    return m.group(1) + body + "\n" + source_line(name, rec) + m.group(4)

  return BLOCK.sub(block, text)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare, do not write")
  args = parser.parse_args()
  differs = []
  for doc in DOCS:
    with open(doc) as f:
      text = f.read()
    out = render(text)
    if args.check:
      if out != text:
        print(f"{doc} differs from `python benchmarks/tables.py`", file=sys.stderr)
        differs.append(doc)
      continue
    with open(doc, "w") as f:
      f.write(out)
  return 1 if differs else 0


if __name__ == "__main__":
  sys.exit(main())
