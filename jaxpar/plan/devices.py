"""The roofline's table of device kinds: published peak numbers per chip, nothing measured here.

- peak_flops: dense bf16 matmul FLOP/s (NVIDIA and Google data sheets; jaxpar.train.costs.PEAK_FLOPS
  holds the same figures for MFU).
- hbm_bytes / hbm_bandwidth: memory per chip and its bandwidth in bytes/s.
- link_bandwidth: one-way bytes/s a device can push into a ring collective inside its fast domain
  (NVLink: 900 GB/s bidirectional -> 450 GB/s one way on H100/H200, 300 GB/s on A100; TPU ICI: a ring
  along one torus axis uses 2 links one way at 45 GB/s (v4, v5e) each).
- domain: devices that share that fast interconnect (an 8-GPU NVLink node; a TPU slice: the pod).
- network_bandwidth: one-way bytes/s per device between domains (one 400 Gb/s NIC per GPU; 200 Gb/s
  on A100 nodes; the TPU table lists the data-center network per chip).
CPU: a nominal row for the 2-core test machine's simulated devices, so the planner runs there; its
times are not predictions of anything.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    link_bandwidth: float
    domain: int
    network_bandwidth: float


GB = 1e9
DEVICE_KINDS = {
    kind.name: kind
    for kind in (
        DeviceKind("H100", 989e12, 80 * 2**30, 3.35e12, 450 * GB, 8, 50 * GB),
        DeviceKind("H200", 989e12, 141 * GB, 4.8e12, 450 * GB, 8, 50 * GB),
        DeviceKind("A100", 312e12, 80 * 2**30, 2.039e12, 300 * GB, 8, 25 * GB),
        DeviceKind("TPU v4", 275e12, 32 * 2**30, 1.2e12, 90 * GB, 4096, 12.5 * GB),
        DeviceKind("TPU v5e", 197e12, 16 * 2**30, 0.819e12, 90 * GB, 256, 12.5 * GB),
        DeviceKind("CPU", 1e11, 16 * 2**30, 2e10, 1e10, 8, 1e10),
    )
}


def device_kind(name: str) -> DeviceKind:
    """The table row for `name` (case and spaces ignored: 'tpu_v4', 'TPU v4', 'h100' all work)."""
    key = name.lower().replace("_", " ").replace("-", " ")
    for kind in DEVICE_KINDS.values():
        if kind.name.lower() == key:
            return kind
    raise ValueError(
        f"device kind {name!r} is not in the roofline table; choose one of {list(DEVICE_KINDS)}."
    )


def for_device(jax_device_kind: str) -> DeviceKind:
    """The row whose name a jax `device.device_kind` contains ('NVIDIA H100 80GB HBM3' -> H100; 'TPU v5
    lite' -> TPU v5e); CPU when none does."""
    text = jax_device_kind.lower().replace("v5 lite", "v5e").replace("v5litepod", "v5e")
    for kind in DEVICE_KINDS.values():
        if kind.name.lower() in text:
            return kind
    return DEVICE_KINDS["CPU"]
