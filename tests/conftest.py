"""Every test runs on 8 simulated CPU devices. Each pytest-xdist worker imports this file before any test
module, so the count is set before jax's backend starts in that process."""

import os

import jax

from jaxpar.machine import simulate_cpu_devices

simulate_cpu_devices(8)
# No test downloads: Hugging Face datasets and hub lookups (lm-eval tasks, tokenizers) stay local.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    assert jax.device_count() == 8, f"tests need 8 simulated CPU devices, found {jax.devices()}"
