#!/usr/bin/env bash
# Training on Cloud TPU VMs: launch/tpu_vm.py (queued resources, the code on every worker,
# background workers logging to WORKDIR/logs/worker-N.log, a supervisor that relaunches after
# preemption or maintenance). Same flags; see its docstring.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--accelerator_type v5p-128] --config CFG \
#       --workdir gs://BUCKET/run [--dry_run] [-- TRAIN_FLAGS...]
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/tpu_vm.py" "$@"
