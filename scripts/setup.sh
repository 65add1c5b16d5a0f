#!/usr/bin/env bash
# Creates .venv with the Python on PATH (override: PYTHON=python3.12 scripts/setup.sh) and installs
# jaxpar with its test extras. Safe to rerun: an up-to-date venv costs a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
