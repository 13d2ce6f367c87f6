#!/usr/bin/env bash
# Serving check for a GPU machine: serves a Hugging Face export with vLLM and compares its
# greedy tokens with the project's sampler on the same prompts; prints one JSON object.
#
#   bash benchmarks/vllm_check.sh EXPORT_DIR [NEW_TOKENS]
#
# EXPORT_DIR: an export made by `python -m cwm_jax.convert --to hf` or by training (runs/smoke/hf,
# WORKDIR/hf/step_N): config.json, safetensors, tokenizer.json and generation_config.json.
# Needs an NVIDIA GPU and vLLM (`pip install vllm`, or VLLM=/path/to/vllm); the project's
# sampler runs on the CPU (JAX_PLATFORMS=cpu) so that the two never share the GPU's memory.
# vLLM stops at the export's generation_config.json eos ids (--generation-config auto), the
# project's sampler at the tokenizer's stop ids: the same ids when the export is complete.
# Exit 0 when every prompt's tokens agree, 1 when one differs, 2 on bad arguments, 3 when
# there is no GPU or no vLLM (nothing is compared then).
set -euo pipefail

EXPORT=${1:-}
NEW=${2:-32}
PY=${PYTHON:-.venv/bin/python}
VLLM=${VLLM:-vllm}
PORT=${PORT:-8011}
if [[ -z "$EXPORT" || ! -f "$EXPORT/config.json" ]]; then
  echo "usage: bash benchmarks/vllm_check.sh EXPORT_DIR [NEW_TOKENS] (EXPORT_DIR holds config.json)" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo '{"skipped": "no NVIDIA GPU: vLLM serves on a GPU; run this on a GPU machine"}'
  exit 3
fi
if ! command -v "$VLLM" >/dev/null; then
  echo '{"skipped": "vllm not found: pip install vllm (or set VLLM=/path/to/vllm)"}'
  exit 3
fi

LOG=$(mktemp -t vllm_check.XXXXXX.log)
"$VLLM" serve "$EXPORT" --port "$PORT" --dtype float32 --generation-config auto \
  --max-model-len 4096 --enforce-eager >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

EXPORT="$EXPORT" NEW="$NEW" PORT="$PORT" SERVER="$SERVER" LOG="$LOG" JAX_PLATFORMS=cpu "$PY" - <<'EOF'
import json, os, sys, time, urllib.request

from cwm_jax.infer import loading, sampler

export, new, port = os.environ["EXPORT"], int(os.environ["NEW"]), os.environ["PORT"]
url = f"http://127.0.0.1:{port}/v1"
deadline = time.time() + 900
while True:   # the server loads the weights and compiles before it answers
  try:
    models = json.load(urllib.request.urlopen(f"{url}/models", timeout=5))
    break
  except OSError:
    if time.time() > deadline or os.waitpid(int(os.environ["SERVER"]), os.WNOHANG)[0]:
      sys.exit(f"vLLM did not start; its log: {os.environ['LOG']}")
    time.sleep(3)
name = models["data"][0]["id"]

model, tok = loading.load_for_inference(export)
prompts = [tok.encode("def fibonacci(n):\n", bos=True),
           tok.encode_dialog([("user", "What does `sorted('banana')` return?")]),
           tok.trace_prompt("def f(n):\n  total = 0\n  for i in range(n):\n    total += i\n"
                            "  return total\n")]
ours = sampler.generate(model, prompts, max_new_tokens=new, stop_ids=tok.stop_ids).tokens

rows = []
for prompt, mine in zip(prompts, ours):
  body = {"model": name, "prompt": prompt, "max_tokens": new, "temperature": 0.0,
          "logprobs": 0, "return_tokens_as_token_ids": True, "skip_special_tokens": False}
  req = urllib.request.Request(f"{url}/completions", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
  choice = json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]
  theirs = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
  # vLLM may leave the stop token out of its output; compare without a final stop id.
  strip = lambda ids: ids[:-1] if ids and ids[-1] in tok.stop_ids else ids
  first = next((i for i, (a, b) in enumerate(zip(strip(mine), strip(theirs))) if a != b), None)
  rows.append({"prompt_tokens": len(prompt), "ours": mine, "vllm": theirs,
               "equal": strip(mine) == strip(theirs), "first_difference": first})
print(json.dumps({"export": export, "new_tokens": new, "prompts": len(rows),
                  "all_equal": all(r["equal"] for r in rows), "rows": rows}, indent=1))
sys.exit(0 if all(r["equal"] for r in rows) else 1)
EOF
