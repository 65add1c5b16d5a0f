#!/usr/bin/env python3
"""Launch one run per point of a sweep defined next to its config (`get_sweep(name)` in the config file).

  python scripts/sweep.py --config=configs/lm.py:smoke --sweep=lr --workdir=SWEEP_DIR \
      --target=local|multiprocess|slurm|tpu-vm [--config.KEY=VALUE ...] [target options]

Each point runs in SWEEP_DIR/<its overrides, e.g. learning_rate=0.001>; SWEEP_DIR/manifest.json records
the sweep. On slurm the points are one job array (SWEEP_DIR/sweep.sbatch); locally they run one after
another. Then: python scripts/collect.py SWEEP_DIR. Target options are those of scripts/submit.py.
"""

from absl import app

from jaxpar.launch import cli

cli.define_flags(sweep=True)

if __name__ == "__main__":
    app.run(cli.run(cli.sweep_main))
