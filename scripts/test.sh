#!/usr/bin/env bash
# Sets up, then runs the whole test suite on 8 simulated CPU devices (tests/conftest.py forces them).
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -n 2 "$@"
