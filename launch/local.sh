#!/usr/bin/env bash
# Starts N training processes on this machine, forming one multi-process JAX job.
#
#   launch/local.sh 2 --config configs/smoke.py --workdir /tmp/run [--config.a.b=v ...]
#
# Process 0 is the coordinator (127.0.0.1:$PORT, random by default). On CPU each
# process gets $DEVICES_PER_PROCESS (default 4) simulated devices and gloo
# collectives. SIGTERM/SIGINT are forwarded to every process (each saves a
# checkpoint at JAX's preemption sync point); the exit code is the first failure.
set -uo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N_PROCESSES --config FILE --workdir DIR [flags...]" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
  XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}}" \
    "$python" -m cwm_jax.train "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; status=$?
    kill -0 "$pid" 2>/dev/null || break  # still alive: wait was interrupted by a signal
  done
  [[ $rc -eq 0 && $status -ne 0 ]] && rc=$status
done
exit $rc
