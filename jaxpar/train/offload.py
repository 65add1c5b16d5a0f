"""Host offload of the optimizer state (config.offload.optimizer_state, ZeRO-Offload's placement).

The optimizer's state is stored in `pinned_host` memory: its shardings are the device shardings with
memory kind "pinned_host", so the jitted train step takes it from host memory and returns the new state
there (out_shardings), and `init` creates it there. Inside the step, `to_device` moves it onto the
device right before the update (XLA schedules the host-to-device copies; the backward pass, the
activation peak, runs without the moments on the device) and the result leaves for the host as the
step's output.

Why the update runs on the device and not on the host: XLA's host compute (`compute_on("device_host")`)
is not available on every backend, and moving the gradients to the host costs as many bytes over the
link as moving the moments to the device (AdamW: two moments per gradient, so the host update saves
half the traffic at best) while running the update at host memory bandwidth. The device update keeps
one program for every backend, and it is the same math: tests/test_offload.py checks the states equal.
"""

from __future__ import annotations

import jax

HOST = "pinned_host"
DEVICE = "device"


def with_memory_kind(shardings, kind: str):
    """The same shardings with memory kind `kind` (a tree of NamedShardings)."""
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def host_optimizer_state(state_shardings):
    """TrainState shardings with the optimizer state's in pinned host memory."""
    return state_shardings.replace(opt_state=with_memory_kind(state_shardings.opt_state, HOST))


def to_device(tree, device_shardings):
    """Inside a jitted function: `tree` (in host memory) copied into device memory, same layout."""
    return jax.device_put(tree, device_shardings)
