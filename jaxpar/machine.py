"""What a benchmark ran on (every committed figure names its machine and versions), and the simulated CPU
devices that scripts and tests run on."""

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
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or platform.machine() or "unknown",
    )


def describe() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summary(machine: dict) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['devices']} x {machine['device_kind']} "
        f"({machine['backend']}); jax {machine['jax']}, jaxlib {machine['jaxlib']}, flax {machine['flax']}; "
        f"{machine['date']}"
    )


def simulate_cpu_devices(n: int = 8) -> None:
    """Run this process on `n` simulated CPU devices, unless the user (or a parent process) chose otherwise.

    A chosen platform (JAX_PLATFORMS) is kept, else the platform is the CPU; a chosen device count
    (--xla_force_host_platform_device_count in XLA_FLAGS, or JAX_NUM_CPU_DEVICES: how a parent sizes its
    child) is kept, else it is `n`. jax reads both when its backend starts, so call this before the first
    jax operation, e.g. at the start of `main()`; a backend that already started with another number of
    CPU devices is an error.
    """
    if jax.config.jax_platforms is None:
        jax.config.update("jax_platforms", "cpu")
    if "cpu" not in jax.config.jax_platforms.split(",") or _cpu_device_count_chosen():
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # jax refuses a new count once its backend started; only a different count is wrong
        started = len(jax.devices("cpu"))
        if started != n:
            raise RuntimeError(
                f"simulate_cpu_devices({n}): the CPU backend already started with {started} device(s); "
                "call it before the first jax operation (at the start of main(), before anything touches a "
                "device)."
            ) from None


def _cpu_device_count_chosen() -> bool:
    return (
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        or "JAX_NUM_CPU_DEVICES" in os.environ
    )
