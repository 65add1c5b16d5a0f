"""Every test runs on 8 simulated CPU devices. Each pytest-xdist worker imports this file before any test
module, so the count is set before jax's backend starts in that process.

The programs compiled in a test process are small and run a few times each: XLA:CPU's LLVM optimisation is
most of their compile time and buys them little, so this process compiles without it (XLA's HLO passes,
fusion included, still run; same math, same numbers within every test's tolerance). Only this process: the
flag is taken out of the environment once the backend has started, so training runs a test starts as a
subprocess (hundreds of steps, where optimised code pays) compile as a user's do. A level already in
XLA_FLAGS is kept: XLA_FLAGS=--xla_backend_optimization_level=3 runs the suite as production compiles."""

import os

import jax

from jaxpar.machine import simulate_cpu_devices

FAST_COMPILE = "--xla_backend_optimization_level=0"
_user_flags = os.environ.get("XLA_FLAGS")
if "--xla_backend_optimization_level" not in (_user_flags or ""):
    os.environ["XLA_FLAGS"] = f"{_user_flags or ''} {FAST_COMPILE}".strip()
simulate_cpu_devices(8)
jax.devices()  # starts the backend, which reads XLA_FLAGS
if _user_flags is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _user_flags
# No test downloads: Hugging Face datasets and hub lookups (lm-eval tasks, tokenizers) stay local.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    assert jax.device_count() == 8, f"tests need 8 simulated CPU devices, found {jax.devices()}"
