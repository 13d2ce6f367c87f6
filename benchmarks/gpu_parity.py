"""cuDNN attention ('cudnn') against the dense reference on a GPU, in bfloat16.

  python benchmarks/gpu_parity.py [--save]

Cases: packed documents with padding, GQA 16/4 heads, head dim 128, a local
window and a global one, and a batch whose rows hold more documents than the
cuDNN layout's cap (the chunked fallback). Each case compares the output and
the gradients of a fixed random projection of it with `reference_attention`
run in float32 on the same bf16 inputs, and, as the yardstick, the reference
itself run in bf16. Gradients are compared relative to their largest entry.
A case passes when cuDNN's error is <= max(2e-2, 2 x the bf16 reference's).
Prints one JSON object; exit code 1 if a case fails, 0 (with "skipped") off GPU. `--save` also
writes it under benchmarks/results/gpu_parity/ (`results_io`; not a run skipped off GPU).
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io

from cwm_jax import kernels
from cwm_jax.kernels import cudnn, packing

CASES = (  # name, T, documents per row, padding, window, max_segments
  ("packed_local", 2048, 7, 100, 512, None),
  ("packed_global", 2048, 7, 100, 2048, None),
  ("one_document_local", 4096, 1, 0, 1024, None),
  ("fallback_many_documents", 1024, 12, 0, 256, 4),
)


def _inputs(t, n_docs, pad, seed=0, b=2, n=16, k=4, h=128):
  rng = np.random.default_rng(seed)
  qkv = [jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.bfloat16) for heads in (n, k, k)]
  rows = []
  for _ in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t - pad), n_docs - 1, replace=False))
    ids = np.repeat(np.arange(1, n_docs + 1), np.diff(np.r_[0, cuts, t - pad]))
    rows.append(np.r_[ids, np.zeros(pad, int)])
  return qkv, jnp.asarray(np.stack(rows), jnp.int32)


def _value_and_grads(attn, q, k, v):
  proj = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * proj)
  return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _errors(got, want):
  out, grads = got
  want_out, want_grads = want
  err = {"out": float(jnp.max(jnp.abs(out.astype(jnp.float32) - want_out)))}
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    scale = float(jnp.max(jnp.abs(w)))
    err[name] = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) / scale
  return err


def run_case(name, t, n_docs, pad, window, max_segments):
  (q, k, v), seg = _inputs(t, n_docs, pad)
  fits = bool(
    jnp.all(packing.packed_layout(seg, max_segments or cudnn.default_max_segments(t)).fits_B)
  )
  gpu = lambda q, k, v: cudnn.cudnn_attention(
    q, k, v, seg, window=window, chunk=256, max_segments=max_segments
  )
  ref = lambda q, k, v: kernels.attend(q, k, v, seg, window=window, impl="reference")
  got = jax.jit(lambda *a: _value_and_grads(gpu, *a))(q, k, v)
  want = jax.jit(lambda *a: _value_and_grads(ref, *a))(*(x.astype(jnp.float32) for x in (q, k, v)))
  ref_bf16 = jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v)
  err, yardstick = _errors(got, want), _errors(ref_bf16, want)
  ok = all(err[key] <= max(2e-2, 2 * yardstick[key]) for key in err)
  return {
    "case": name,
    "T": t,
    "documents": n_docs,
    "window": window,
    "cudnn_layout": fits,
    "max_err": {k: round(e, 5) for k, e in err.items()},
    "reference_bf16_err": {k: round(e, 5) for k, e in yardstick.items()},
    "ok": ok,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--save", action="store_true", help="also write it under benchmarks/results/")
  a = p.parse_args()
  if jax.default_backend() != "gpu":
    print(
      json.dumps(
        {"ok": None, "skipped": f"needs an NVIDIA GPU; backend is {jax.default_backend()!r}"}
      )
    )
    return 0
  results = [run_case(*case) for case in CASES]
  ok = all(r["ok"] for r in results)
  result = {"ok": ok, "device": jax.devices()[0].device_kind, "cases": results}
  print(json.dumps(result))
  if a.save:
    print("saved", results_io.save("gpu_parity", result), file=sys.stderr)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
