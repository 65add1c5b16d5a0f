"""The sentence a refused run ends with: the planner's best fitting alternative on the same devices."""

from __future__ import annotations

import jax

from jaxpar.config import RunConfig
from jaxpar.plan import devices as devices_lib, search

GiB = 2**30


def alternative(run: RunConfig, num_devices: int, bytes_limit: int, device_kind: str | None = None) -> str:
    """'The planner's best fitting alternative on N x KIND: --config.mesh.data=... (about X GiB per
    device, ...)', or why there is none. `device_kind`: a jax device_kind string (default: this
    process's first device)."""
    kind = devices_lib.for_device(device_kind if device_kind is not None else jax.devices()[0].device_kind)
    best = search.best_alternative(run, num_devices, bytes_limit, kind)
    if best is None:
        return (
            f"No plan of this model fits {num_devices} devices of {bytes_limit / GiB:.2f} GiB (meshes, "
            "remat policies, microbatching and offload tried: scripts/plan.py lists why); use more devices "
            "or a smaller model."
        )
    return (
        f"The planner's best fitting alternative on {num_devices} x {kind.name}: {best.flags()} (about "
        f"{best.memory['total'] / GiB:.2f} GiB per device, {best.cost.step_s:.3g} s per step by the "
        f"{kind.name} roofline; scripts/plan.py ranks the others)."
    )
