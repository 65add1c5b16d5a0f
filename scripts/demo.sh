#!/usr/bin/env bash
# Sets up, then trains the smoke LM on 8 simulated CPU devices (mesh data=2 x fsdp=2 x tensor=2).
# Extra arguments go to the training script, e.g. scripts/demo.sh --config.train.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WORKDIR="${WORKDIR:-runs/smoke}"
.venv/bin/python experiments/train_lm.py --config=configs/lm.py:smoke --workdir="$WORKDIR" "$@"
echo "metrics: $WORKDIR/metrics.jsonl  loss plot: $WORKDIR/loss.png  tensorboard: $WORKDIR/tensorboard"
