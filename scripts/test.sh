#!/usr/bin/env bash
# Sets up, checks formatting and lint (ruff, settings in pyproject.toml), then runs the whole test suite on 8
# simulated CPU devices (tests/conftest.py forces them) and lists the 15 slowest tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
# A lint failure does not stop the tests: one run reports both, and the exit status is non-zero if either
# failed. Fix formatting and the auto-fixable rules with: .venv/bin/ruff format && .venv/bin/ruff check --fix
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

lint=0
.venv/bin/ruff format --check || lint=1
.venv/bin/ruff check || lint=1

# A persistent XLA compilation cache, shared by the pytest workers and the processes the tests start. JAX keys
# an entry by the program (here with its source locations, so the op names and metadata in compiled HLO are
# always those of the current code), the jaxlib version, XLA_FLAGS, the compile options and the devices, so a
# hit gives the executable a fresh compile would; programs with host callbacks are never cached. XLA:CPU
# compiles for the host's instruction set, which the CPU key leaves out: one directory per set of CPU flags.
# It only saves time and may be deleted at any moment; it is cleared when it grows past 2 GB.
# JAX_COMPILATION_CACHE_DIR= scripts/test.sh runs without it.
cpu="$({ grep -m1 '^flags' /proc/cpuinfo; uname -m; } 2>/dev/null | cksum | cut -d' ' -f1)"
if [ -d .cache/jax ] && [ "$(du -sm .cache/jax | cut -f1)" -gt 2048 ]; then rm -rf .cache/jax; fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR-$PWD/.cache/jax/cpu-$cpu}"
export JAX_COMPILATION_CACHE_INCLUDE_METADATA_IN_KEY=1
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.1  # below: saves tens of ms, not worth an entry
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1    # no minimum size

status=0
.venv/bin/python -m pytest -n 2 --durations=15 "$@" || status=$?
if [ "$lint" != 0 ]; then
  echo "scripts/test.sh: ruff found formatting or lint problems (listed above the tests)." >&2
  [ "$status" != 0 ] || status=1
fi
exit "$status"
