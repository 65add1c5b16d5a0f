"""Joins this process to a multi-process JAX job when its launcher asks for it.

Experiments call `maybe_initialize()` first thing in `main`. jaxpar does not replace JAX's multi-controller
runtime; it only decides whether and how to call `jax.distributed.initialize`:

  JAXPAR_COORDINATOR=host:port   set by the `multiprocess` launcher, with JAXPAR_NUM_PROCESSES and
                                 JAXPAR_PROCESS_ID: explicit arguments (CPU devices joined through gloo).
  JAXPAR_DISTRIBUTED=1           set by the sbatch scripts and TPU VM commands: `initialize()` with no
                                 arguments, so JAX reads the cluster from SLURM_* variables or TPU metadata.
  neither, inside a Slurm step   with more than one task (a hand-written `srun` line): as
                                 JAXPAR_DISTRIBUTED=1.

JAXPAR_HEARTBEAT_TIMEOUT (seconds, default JAX's 100) bounds how long survivors wait for a dead peer before
they abort instead of hanging.

JAXPAR_LOCAL_DEVICES=visible (set by sbatch scripts with --gpus-per-task, or one task per node): this process
drives every GPU in CUDA_VISIBLE_DEVICES. JAX's Slurm detection otherwise assumes one GPU per task, indexed by
SLURM_LOCALID among GPUs all tasks see, which breaks when Slurm binds GPUs to tasks (jax-ml/jax#23452) and
uses one GPU of eight with one task per node (jax-ml/jax#16788).
"""

from __future__ import annotations

import os
import sys

COORDINATOR = "JAXPAR_COORDINATOR"
NUM_PROCESSES = "JAXPAR_NUM_PROCESSES"
PROCESS_ID = "JAXPAR_PROCESS_ID"
DISTRIBUTED = "JAXPAR_DISTRIBUTED"
HEARTBEAT_TIMEOUT = "JAXPAR_HEARTBEAT_TIMEOUT"
LOCAL_DEVICES = "JAXPAR_LOCAL_DEVICES"


def _visible_gpu_ids(env) -> list[int] | None:
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return list(range(len(visible))) or None


def _wanted(env) -> str | None:
    """'explicit', 'auto' or None (single process)."""
    if env.get(COORDINATOR):
        return "explicit"
    if env.get(DISTRIBUTED, "").lower() in ("1", "true", "auto"):
        return "auto"
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
        return "auto"
    return None


def maybe_initialize(env=None) -> bool:
    """Calls `jax.distributed.initialize` if the environment describes a multi-process job; returns whether
    it did. Safe to call twice (the second call does nothing)."""
    env = os.environ if env is None else env
    mode = _wanted(env)
    if mode is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if env.get(HEARTBEAT_TIMEOUT):
        kwargs["heartbeat_timeout_seconds"] = int(env[HEARTBEAT_TIMEOUT])
    visible = _visible_gpu_ids(env) if env.get(LOCAL_DEVICES) == "visible" else None
    if visible:
        kwargs["local_device_ids"] = visible
    if mode == "explicit":
        missing = [name for name in (NUM_PROCESSES, PROCESS_ID) if not env.get(name)]
        if missing:
            raise ValueError(
                f"{COORDINATOR}={env[COORDINATOR]!r} is set but {missing} are not; set all three "
                "(scripts/submit.py --target=multiprocess does)."
            )
        jax.distributed.initialize(
            env[COORDINATOR], num_processes=int(env[NUM_PROCESSES]), process_id=int(env[PROCESS_ID]), **kwargs
        )
    else:
        jax.distributed.initialize(**kwargs)
    print(
        f"jax.distributed: process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices",
        file=sys.stderr,
        flush=True,
    )
    return True
