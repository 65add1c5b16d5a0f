"""Launching: one config on this machine, as several processes, on SLURM or on TPU VMs; sweeps; collection.

distributed.py    maybe_initialize(): jax.distributed.initialize when a launcher's environment asks
job.py            Job (entry, config, overrides, workdir) -> the experiment's command line;
                  launch/status files
local.py          local and multiprocess targets (a supervisor that reports each process's fate)
slurm.py          sbatch scripts (single jobs and arrays), preemption/time-limit requeue, submission
slurm_cluster.py  a private single-node Slurm cluster for tests and workstations
tpu_vm.py         gcloud compute tpus tpu-vm commands
sweep.py          product / zip_ / chain, point names, manifests
collect.py        runs -> table (markdown, csv) and curves, failed and unfinished runs included
cli.py            flags and mains of scripts/submit.py and scripts/sweep.py
"""
