#!/usr/bin/env bash
# GPU check of the 'cudnn' attention path, on one NVIDIA GPU, in under 9 minutes.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR]
#
# 1. uses the JAX of $PYTHON (default .venv/bin/python) as it is when it already sees a GPU
#    (any CUDA plugin: a GPU machine's own image); otherwise installs the CUDA plugin matching
#    its jax (`jax[cuda12]==<jax version>`), from PyPI or, with --wheels, from a local folder of
#    wheels (`pip download 'jax[cuda12]==0.10.2' -d DIR` on a machine with internet);
# 2. runs the GPU tests of tests/test_gpu_attention.py (cuDNN vs reference, bf16);
# 3. benchmarks/gpu_parity.py: cuDNN vs reference, forward + gradients, packed documents,
#    local and global windows, GQA, the fallback, bf16 tolerance (JSON);
# 4. benchmarks/gpu_mfu.py: cwm_1b at 8k, one document per row and 8 packed per row, with
#    cuDNN; the 8B-class cwm_8b at 8k (bf16 params and AdamW state, full remat, chunked loss:
#    what fits one 80 GB GPU); then cwm_1b with the portable `chunked` kernel, for comparison
#    (JSON).
# Prints the versions it runs with, one JSON object per step and a summary object last; exits 1
# if a step failed. Without a GPU it prints {"skipped": ...} and exits 0 before installing
# anything. GPU_CHECK_BUDGET_S (default 530) caps the whole script, install included.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
wheels="" out=${OUT:-/tmp/gpu_check}
while [[ $# -gt 0 ]]; do
  case $1 in
    --wheels) wheels=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--wheels DIR] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo '{"skipped": "no NVIDIA GPU visible (nvidia-smi -L failed); nothing installed or run"}'
  exit 0
fi
nvidia-smi -L >&2

jax_version=$("$PY" -c 'import jax; print(jax.__version__)') || { echo '{"error": "no jax in '"$PY"'"}'; exit 1; }
if JAX_PLATFORMS=cuda "$PY" -c 'import jax; jax.devices()' >/dev/null 2>&1; then
  echo "jax $jax_version already sees the GPU; nothing installed" >&2
else
  src=()
  [[ -n "$wheels" ]] && src=(--no-index --find-links "$wheels")
  echo "installing jax[cuda12]==$jax_version ${src[*]}" >&2
  timeout 180 "$PY" -m pip install -q "${src[@]}" "jax[cuda12]==$jax_version" >&2 \
    || { echo '{"error": "pip install jax[cuda12]=='"$jax_version"' failed; pass --wheels DIR"}'; exit 1; }
fi

export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
backend=$("$PY" -c 'import jax; print(jax.default_backend(), jax.devices()[0].device_kind)' 2>&2)
echo "backend: $backend" >&2
[[ "$backend" == gpu* ]] || { echo '{"error": "jax does not see the GPU after installing the plugin"}'; exit 1; }
"$PY" - <<'EOF' | tee "$out/versions.json"
import importlib.metadata as md, json
import jax
found = {}
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "jax-cuda12-plugin", "jax-cuda13-plugin"):
  try:
    found[name] = md.version(name)
  except md.PackageNotFoundError:
    pass
print(json.dumps({"versions": found, "device": jax.devices()[0].device_kind}))
EOF

status=0
steps=()  # names in the order run, for the summary
BUDGET=${GPU_CHECK_BUDGET_S:-530}  # whole script, install included: under 9 minutes
run() {  # name, timeout seconds (capped by what is left of BUDGET), command...
  local name=$1 limit=$2; shift 2
  steps+=("$name")
  local left=$((BUDGET - SECONDS))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "{\"step\": \"$name\", \"rc\": 124, \"seconds\": 0}" > "$out/$name.rc"
    echo "{\"skipped\": \"time budget of ${BUDGET}s spent\"}" > "$out/$name.out"; status=1; return
  fi
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.err"
  local rc=$?
  [[ $rc -ne 0 ]] && status=1
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" > "$out/$name.rc"
  tail -n 1 "$out/$name.out"
  [[ $rc -ne 0 ]] && tail -n 20 "$out/$name.err" >&2
}

run pytest 100 "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_gpu_attention.py \
  tests/test_kernels.py -k on_gpu -rs
run parity 100 "$PY" benchmarks/gpu_parity.py
run mfu_1doc 130 "$PY" benchmarks/gpu_mfu.py --seq 8192 --batch 1 --docs 1 --steps 20
run mfu_8docs 130 "$PY" benchmarks/gpu_mfu.py --seq 8192 --batch 1 --docs 8 --steps 20
run mfu_8b 150 "$PY" benchmarks/gpu_mfu.py --config cwm_8b --param_dtype bfloat16 --remat full \
  --seq 8192 --batch 1 --docs 1 --steps 10 --loss_chunk 1024 --measure_matmul 0
run mfu_chunked 130 "$PY" benchmarks/gpu_mfu.py --seq 8192 --batch 1 --docs 1 --steps 10 \
  --impl chunked --measure_matmul 0

"$PY" - "$out" "${steps[@]}" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {}
for name in sys.argv[2:]:
  rc = json.loads((out / f"{name}.rc").read_text()) if (out / f"{name}.rc").exists() else {}
  last = (out / f"{name}.out").read_text().strip().splitlines()[-1:] if (out / f"{name}.out").exists() else []
  try:
    result = json.loads(last[0]) if last else None
  except json.JSONDecodeError:
    result = last[0] if last else None
  summary[name] = {"rc": rc.get("rc"), "seconds": rc.get("seconds"), "result": result}
print(json.dumps({"gpu_check": summary}))
EOF
exit $status
