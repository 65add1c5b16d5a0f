"""Helpers for tests that run training jobs as subprocesses, as a user would."""

import os
import time

from jaxpar.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def curve(workdir, keys=("loss", "grad_norm", "lr")) -> dict[int, tuple]:
    """{step: (value per key)} of every logged training step in workdir/metrics.jsonl."""
    return {
        r["step"]: tuple(r[k] for k in keys)
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if "loss" in r
    }


def wait_for_step(workdir, step, process, timeout=300) -> None:
    """Returns once `step` is logged in workdir/metrics.jsonl; fails if `process` exits first."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the job exited before logging step {step}"
        if os.path.exists(path) and any(r.get("step", 0) >= step for r in read_metrics(path)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")
