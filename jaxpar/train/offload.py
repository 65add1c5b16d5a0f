"""Host offload of the optimizer state and of the parameters (config.offload, ZeRO-Offload's placement).

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

Parameters (config.offload.params) are stored in pinned host memory the same way. The model's layer scan
copies each layer's slice onto the device right before running it (`jaxpar.parallel.memory.to_device`,
which leaves device-resident arrays alone, so the program of a run without offload is unchanged); the
leaves no scan slices (embedding, final norm, output head) are copied in at the start of the step by
`fetch_unscanned`. The backward pass sends each layer's gradient back through the transpose of that copy,
into host memory as it is produced (ZeRO-Offload's gradient stream); the update copies parameters and
gradients in and runs on the device like the optimizer state's, its result written back to the host.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxpar.parallel import memory

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


@dataclasses.dataclass(frozen=True)
class HostParams:
    """How a train step handles parameters stored on the host: `device` are their device shardings (what
    the gradients and the update use), `scanned` marks the leaves the layer scan fetches itself."""

    device: object
    scanned: object

    @classmethod
    def of(cls, abstract_params, device_shardings) -> HostParams:
        return cls(device=device_shardings, scanned=scanned_leaves(abstract_params))

    def for_forward(self, params):
        """Inside the step: the parameters the loss reads (unscanned leaves on the device)."""
        return fetch_unscanned(params, self.scanned)

    def for_update(self, params, grads):
        """Inside the step: parameters and gradients on the device, for the optimizer update (the
        gradients of host-resident leaves come out of the backward pass in host memory)."""
        return jax.device_put((params, grads), (self.device, self.device))


def host_params(state_shardings):
    """TrainState shardings with the parameters in pinned host memory."""
    return state_shardings.replace(params=with_memory_kind(state_shardings.params, HOST))


def scanned_leaves(abstract_params):
    """A tree of bools over the parameters: True where the leaf is stacked over layers (its first logical
    axis is "layers"), i.e. sliced and fetched layer by layer by the model's scan."""
    logical = nnx.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda spec: isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0 and spec[0] == "layers",
        logical,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )


def fetch_unscanned(params, scanned):
    """Inside a jitted function: the leaves that no layer scan slices copied onto the device; the scanned
    ones stay where they are (the scan fetches them one layer at a time)."""
    return jax.tree.map(lambda p, s: p if s else memory.to_device(p), params, scanned)
