#!/usr/bin/env bash
# Creates (or reuses) a virtualenv at $1 (default .venv) and installs cwm_jax into it, with the
# extras named in $2 (comma-separated; default none):
#   bash launch/install.sh .venv            the package (what training needs)
#   bash launch/install.sh .venv tpu        + libtpu (TPU VMs, TPU images)
#   bash launch/install.sh .venv cuda12     + JAX's CUDA 12 plugin (GPU machines, GPU images)
#   bash launch/install.sh .venv data       + apache-beam, tensorflow-datasets (corpus builds)
#   bash launch/install.sh .venv test       + data, pytest, torch, transformers, libtpu (the suite)
# Environment:
#   CONSTRAINTS=FILE   pins every package to FILE's versions (default: constraints.txt of this
#                      checkout, the versions the suite passed with); CONSTRAINTS=none installs
#                      the newest versions setup.cfg's ranges allow.
#   SYSTEM_SITE_PACKAGES=1  a new venv sees the machine's packages: on an image with its own
#                      JAX, pip keeps that JAX where it is in range (use with CONSTRAINTS=none,
#                      or the pins replace it).
#   PACKAGE=PATH       install this wheel (or source folder) instead of this checkout in
#                      editable mode: how the TPU VM launcher puts the code on its workers.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-.venv}
extras=${2:-}
constraints=${CONSTRAINTS:-$here/constraints.txt}
if [[ ! -x "$venv/bin/python" ]]; then
  if [[ "${SYSTEM_SITE_PACKAGES:-0}" == 1 ]]; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
pin=()
if [[ "$constraints" != none ]]; then
  [[ -f "$constraints" ]] || { echo "install.sh: constraints file $constraints not found (CONSTRAINTS=none for the newest allowed versions)" >&2; exit 2; }
  pin=(--constraint "$constraints")
fi
if [[ -n "${PACKAGE:-}" ]]; then
  target=("$PACKAGE${extras:+[$extras]}")
else
  target=(-e "$here${extras:+[$extras]}")
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q ${pin[@]+"${pin[@]}"} "${target[@]}"
