#!/usr/bin/env python3
"""Launch one run of an experiment, with the experiment's own config syntax, on a chosen target.

  python scripts/submit.py --target=local|multiprocess|slurm|tpu-vm --config=configs/lm.py:smoke \
      --workdir=DIR [--config.KEY=VALUE ...] [target options]

  multiprocess  --num_processes=2 --devices_per_process=4    (CPU devices, joined by jax.distributed)
  slurm         --nodes --tasks_per_node --gpus_per_task --cpus_per_task --time --partition --account
                --signal_grace --sbatch=--mem=0 --setup='module load cuda'   (writes DIR/job.sbatch)
  tpu-vm        --tpu=NAME --zone=ZONE [--project] [--dry_run]              (gcloud compute tpus tpu-vm)

The entry point defaults from the config file's family (configs/lm.py -> experiments/train_lm.py);
pass --entry to choose another. `--help` lists every option.
"""

from absl import app

from jaxpar.launch import cli

cli.define_flags(sweep=False)

if __name__ == "__main__":
    app.run(cli.run(cli.submit_main))
