#!/usr/bin/env bash
# Creates (or reuses) a virtualenv at $1 (default .venv) and installs cwm_jax into it, with the
# extras named in $2 (comma-separated, e.g. `test` or `tpu`; default none):
#   bash launch/install.sh .venv            the package (what training needs)
#   bash launch/install.sh .venv test       + pytest, torch, transformers, libtpu (the test suite)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
