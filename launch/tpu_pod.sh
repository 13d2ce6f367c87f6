#!/usr/bin/env bash
# Multi-host training on a Cloud TPU pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] --config CFG --workdir gs://BUCKET/run \
#       [--repo_dir ~/cwm_jax] [--num_workers N --coordinator IP] [--dry_run] [-- TRAIN_FLAGS...]
#
# Runs `gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...`; each
# worker exports the jax.distributed environment read by `python -m cwm_jax.train`:
#   JAX_COORDINATOR_ADDRESS  worker 0's internal IP, port $JAX_PORT (8476)
#   JAX_NUM_PROCESSES        the number of workers
#   JAX_PROCESS_ID           the worker's own number (TPU metadata agent-worker-number)
# Worker count and worker-0 IP come from `gcloud compute tpus tpu-vm describe`
# unless given. --dry_run prints the gcloud command(s) without running them.
set -euo pipefail

quote() { local s; s=$(printf '%q ' "$@"); echo "${s% }"; }
usage() { echo "usage: $0 --tpu NAME --zone ZONE [--project P] --config CFG --workdir DIR [--repo_dir D] [--python PY] [--num_workers N] [--coordinator IP] [--dry_run] [-- TRAIN_FLAGS...]" >&2; exit 2; }

tpu="" zone="" project="" config="" workdir="" repo_dir='~/cwm_jax' python=python3
num_workers="" coordinator="" dry_run=0 extra=()
# Accept --flag=value as well as --flag value (up to a literal --).
norm=() passthru=0
for a in "$@"; do
  if [[ $passthru == 0 && $a == --*=* ]]; then norm+=("${a%%=*}" "${a#*=}"); else norm+=("$a"); fi
  [[ $a == -- ]] && passthru=1
done
set -- ${norm[@]+"${norm[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --repo_dir) repo_dir=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --num_workers) num_workers=$2; shift 2 ;;
    --coordinator) coordinator=$2; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && -n "$config" && -n "$workdir" ]] || usage
gcloud_scope=(--zone="$zone")
[[ -n "$project" ]] && gcloud_scope+=(--project="$project")

describe=(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_scope[@]}" --format='value(networkEndpoints[].ipAddress)')
if [[ -z "$num_workers" || -z "$coordinator" ]]; then
  if [[ $dry_run == 1 ]]; then
    echo "# $(quote "${describe[@]}")"
    num_workers=${num_workers:-'<num_workers>'} coordinator=${coordinator:-'<worker0_ip>'}
  else
    ips=$("${describe[@]}" | tr ';' ' ')
    read -r -a ip_list <<< "$ips"
    num_workers=${num_workers:-${#ip_list[@]}}
    coordinator=${coordinator:-${ip_list[0]}}
  fi
fi

train=("$python" -m cwm_jax.train --config="$config" --workdir="$workdir" "${extra[@]}")
worker_id='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
remote="cd $repo_dir && export JAX_COORDINATOR_ADDRESS=$coordinator:${JAX_PORT:-8476}"
remote+=" JAX_NUM_PROCESSES=$num_workers JAX_PROCESS_ID=$worker_id && $(quote "${train[@]}")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_scope[@]}" --worker=all --command="$remote")

if [[ $dry_run == 1 ]]; then
  quote "${cmd[@]}"
else
  "${cmd[@]}"
fi
