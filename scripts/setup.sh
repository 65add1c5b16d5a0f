#!/usr/bin/env bash
# Creates .venv with the Python on PATH (override: PYTHON=python3.12 scripts/setup.sh) and installs
# jaxpar with its test extras. Safe to rerun: while setup.cfg and pyproject.toml are unchanged since the last
# install it does nothing (milliseconds); FORCE=1 scripts/setup.sh reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# The stamp holds a checksum of the files that declare the install (dependencies, extras, the ruff pin); it is
# written only after pip succeeds, so an interrupted install is retried on the next run.
stamp=.venv/.jaxpar-install-stamp
want="$(cat setup.cfg pyproject.toml | cksum)"
if [ "${FORCE:-0}" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # hanabi-learning-environment 0.0.4's CMakeLists asks for CMake < 3.5, which CMake 4 refuses without this
  CMAKE_POLICY_VERSION_MINIMUM=3.5 .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
fi
