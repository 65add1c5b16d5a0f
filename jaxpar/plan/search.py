"""Enumerate plans for a run on N devices, predict each one's memory and step time, rank them.

A plan is the run with its mesh (every axis of jaxpar.parallel.mesh.MESH_AXES), its remat policy, its
microbatching (train.grad_accum_steps, or the pipeline's schedule and microbatches) and its offload
choices replaced. Each is validated by jaxpar.config.validate_run (its ConfigError is the rejection
reason: a mesh that does not divide the model, a schedule that needs more microbatches, ...), then its
per-device memory estimated (jaxpar.train.fit.estimate) and compared with the device's memory, then its
step time predicted (jaxpar.plan.cost.step_cost). Fitting plans rank by predicted step time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping

from jaxpar.config import ConfigError, MeshConfig, OffloadConfig, RunConfig, validate_run
from jaxpar.parallel.mesh import MESH_AXES
from jaxpar.plan import cost as cost_lib
from jaxpar.plan.devices import DeviceKind
from jaxpar.train import fit

GiB = 2**30
REMATS = ("none", "save_dots", "full", "offload")
# nothing, the optimizer state, the optimizer state and the parameters (ZeRO-Offload's order of savings)
OFFLOADS = (
    OffloadConfig(),
    OffloadConfig(optimizer_state=True),
    OffloadConfig(optimizer_state=True, params=True),
)
SCHEDULES = ("1f1b", "gpipe")  # the tables with one chunk per stage; interleaving is left to the user


@dataclasses.dataclass
class Plan:
    run: RunConfig
    sizes: dict
    memory: dict | None = None  # fit.estimate's parts
    cost: cost_lib.StepCost | None = None
    reason: str = ""  # why it was rejected; "" when it fits

    @property
    def fits(self) -> bool:
        return not self.reason

    def overrides(self) -> dict:
        """The config keys that make this plan (every mesh axis; the choices the planner varied)."""
        r = self.run
        out = {f"mesh.{axis}": self.sizes[axis] for axis in MESH_AXES}
        out["model.remat"] = r.model.remat
        if self.sizes["pipeline"] > 1:
            out["pipeline.schedule"] = r.pipeline.schedule
            out["pipeline.microbatches"] = r.pipeline.microbatches
        else:
            out["train.grad_accum_steps"] = r.train.grad_accum_steps
        out["offload.optimizer_state"] = r.offload.optimizer_state
        out["offload.params"] = r.offload.params
        return out

    def flags(self) -> str:
        return " ".join(f"--config.{key}={value}" for key, value in self.overrides().items())

    def mesh_label(self) -> str:
        return " ".join(f"{a}={s}" for a, s in self.sizes.items() if s > 1) or "single device"

    def as_dict(self) -> dict:
        return {
            "mesh": self.sizes,
            "overrides": self.overrides(),
            "fits": self.fits,
            "reason": self.reason,
            "memory_bytes": self.memory,
            "step_s": self.cost.step_s if self.cost else None,
            "compute_s": self.cost.compute_s if self.cost else None,
            "comm_s": self.cost.comm_s if self.cost else None,
            "bubble": self.cost.bubble if self.cost else None,
            "flops_per_device": self.cost.flops if self.cost else None,
            "comm_bytes_per_device": self.cost.comm_bytes if self.cost else None,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(run: RunConfig, num_devices: int) -> Iterator[dict[str, int]]:
    """Every assignment of the devices to the six axes (sizes multiplying to num_devices). The expert
    axis only for MoE models, the pipeline axis only up to the layer count."""
    choices = []
    for axis in MESH_AXES:
        sizes = _divisors(num_devices)
        if axis == "expert" and not run.model.moe.experts:
            sizes = [1]
        if axis == "pipeline":
            sizes = [s for s in sizes if s <= run.model.n_layers]
        choices.append(sizes)
    for combo in itertools.product(*choices):
        product = 1
        for size in combo:
            product *= size
        if product == num_devices:
            yield dict(zip(MESH_AXES, combo))


def variants(run: RunConfig, sizes: Mapping[str, int], offload_choices) -> Iterator[RunConfig]:
    """The run on this mesh under every remat policy, microbatching and offload choice."""
    mesh = MeshConfig(**sizes)
    train = run.train
    for remat, offload in itertools.product(REMATS, offload_choices):
        model = dataclasses.replace(run.model, remat=remat)
        base = dataclasses.replace(run, model=model, mesh=mesh, offload=offload)
        if sizes["pipeline"] > 1:
            stages = sizes["pipeline"]
            for schedule, factor in itertools.product(SCHEDULES, (1, 2, 4, 8)):
                pipeline = dataclasses.replace(
                    run.pipeline, schedule=schedule, microbatches=stages * factor, virtual_stages=1
                )
                yield dataclasses.replace(
                    base, pipeline=pipeline, train=dataclasses.replace(train, grad_accum_steps=1)
                )
        else:
            for accum in (1, 2, 4, 8, 16):
                if train.global_batch % accum == 0:
                    yield dataclasses.replace(base, train=dataclasses.replace(train, grad_accum_steps=accum))


def evaluate(run: RunConfig, num_devices: int, bytes_limit: int, device: DeviceKind) -> Plan:
    """One plan: validated, its memory estimated, its step time predicted, rejected with a reason."""
    try:
        sizes = validate_run(run, num_devices)
    except ConfigError as error:
        return Plan(run, run.mesh.as_dict(), reason=f"invalid: {error}")
    try:
        memory = fit.estimate(run, sizes)
    except (ConfigError, ValueError) as error:  # a shape the traced program refuses
        return Plan(run, sizes, reason=f"invalid: {error}")
    plan = Plan(run, sizes, memory, cost_lib.step_cost(run, sizes, memory, device))
    if memory["total"] > bytes_limit:
        parts = sorted(fit.PARTS, key=lambda k: -memory[k])[:2]
        plan.reason = (
            f"needs {memory['total'] / GiB:.2f} GiB > {bytes_limit / GiB:.2f} GiB per device (largest: "
            + ", ".join(f"{k} {memory[k] / GiB:.2f}" for k in parts)
            + ")"
        )
    return plan


def search(
    run: RunConfig, num_devices: int, bytes_limit: int, device: DeviceKind, offload: bool = True
) -> list[Plan]:
    """Every plan, ranked: fitting plans by predicted step time (then memory), then the rejected ones
    that were valid by memory, then the invalid ones. `offload`: also try config.offload choices
    (otherwise the run's own)."""
    offload_choices = OFFLOADS if offload else (run.offload,)
    plans = [
        evaluate(candidate, num_devices, bytes_limit, device)
        for sizes in meshes(run, num_devices)
        for candidate in variants(run, sizes, offload_choices)
    ]

    def rank(plan: Plan):
        if plan.cost is None:
            return (2, 0.0, 0)
        return (0 if plan.fits else 1, plan.cost.step_s, plan.memory["total"])

    return sorted(plans, key=rank)


def best_alternative(run: RunConfig, num_devices: int, bytes_limit: int, device: DeviceKind) -> Plan | None:
    """The fastest predicted plan that fits, or None."""
    plans = search(run, num_devices, bytes_limit, device)
    return plans[0] if plans and plans[0].fits else None


def frontier(plans: list[Plan]) -> list[Plan]:
    """The Pareto frontier of the valid plans in (memory, step time): none other is both smaller and
    faster."""
    valid = sorted((p for p in plans if p.cost), key=lambda p: (p.memory["total"], p.cost.step_s))
    out, best = [], float("inf")
    for plan in valid:
        if plan.cost.step_s < best:
            out.append(plan)
            best = plan.cost.step_s
    return out
