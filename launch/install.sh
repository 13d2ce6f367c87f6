#!/usr/bin/env bash
# Creates (or reuses) a virtualenv at $1 (default .venv) and installs cwm_jax with test deps.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test]"
