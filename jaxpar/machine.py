"""What a benchmark ran on: every committed figure names its machine and versions."""

import datetime
import os
import pathlib
import platform

import flax
import jax
import jaxlib


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine() or "unknown")


def describe() -> dict:
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summary(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['devices']} x {machine['device_kind']} "
            f"({machine['backend']}); jax {machine['jax']}, jaxlib {machine['jaxlib']}, flax {machine['flax']}; "
            f"{machine['date']}")
