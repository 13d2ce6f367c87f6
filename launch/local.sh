#!/usr/bin/env bash
# Starts N training processes on this machine, forming one multi-process JAX job: the
# local rehearsal of a cluster launch, with the same process contract as launch/'s
# cluster launchers.
#
#   launch/local.sh N --config configs/smoke.py --workdir gs://BUCKET/run [--config.a.b=v ...]
#
# Contract (what every launcher gives each process): JAX_COORDINATOR_ADDRESS (process 0's
# host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID; SIGTERM is the preemption notice.
# - Process 0 is the coordinator (127.0.0.1:$PORT, random by default). On CPU each
#   process gets $DEVICES_PER_PROCESS (default 4) simulated devices and gloo collectives.
# - SIGTERM/SIGINT to this script are forwarded to every process: each saves a checkpoint
#   at JAX's preemption sync point (the same step everywhere) and exits 0.
# - A process that exits non-zero (a lost host) ends the job: the others are killed
#   ($GRACE_S seconds after a TERM, default 30; as a cluster's job controller does) and
#   this script exits with the first failure's code. Relaunching the same command resumes
#   from the workdir's last committed checkpoint.
# - $TRAIN_PROGRAM (default `-m cwm_jax.train`) is what follows `python` on each process.
set -uo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N_PROCESSES --config FILE --workdir DIR [flags...]" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
grace=${GRACE_S:-30}
read -ra program <<< "${TRAIN_PROGRAM:--m cwm_jax.train}"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
  XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}}" \
    "$python" "${program[@]}" "$@" &
  pids+=($!)
done

# Reap processes as they end (in any order); the first failure stops the rest.
rc=0
declare -A live=()
for pid in "${pids[@]}"; do live[$pid]=1; done
while ((${#live[@]} > 0)); do
  ended=""
  wait -n -p ended "${!live[@]}"; status=$?
  [[ -z "${ended:-}" ]] && continue  # interrupted by a forwarded signal; keep waiting
  unset "live[$ended]"
  if [[ $status -ne 0 && $rc -eq 0 ]]; then
    rc=$status
    echo "local.sh: process $ended exited with $status; stopping the job" >&2
    kill -TERM "${!live[@]}" 2>/dev/null
    ( sleep "$grace"; kill -KILL "${pids[@]}" 2>/dev/null ) &
    killer=$!
  fi
done
[[ -n "${killer:-}" ]] && kill "$killer" 2>/dev/null
exit $rc
