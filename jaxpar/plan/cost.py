"""FLOPs, collective bytes and a roofline step time of one train step, per device.

Communication reuses jaxpar.train.costs: `expected_terms` (FSDP, data-parallel and Megatron tensor
parallelism with sequence parallelism, the terms the compiled HLO is checked against in
tests/test_costs.py) and `sequence_terms` (ring / Ulysses / USP / all-gather attention, LASP-2); the
pipeline's ppermutes and the MoE all-to-alls are added here with the same byte convention (per device
per step, the full buffer on the wide side). Wire bytes apply the ring factors of
jaxpar.parallel.analysis.CollectiveOp.wire_bytes.

The step time is a roofline, stated rather than fitted:

    compute = max(FLOPs / peak_flops, HBM bytes / hbm_bandwidth)
    comm    = sum over mesh axes of wire bytes / (link_bandwidth inside a domain, else network_bandwidth)
    time    = (compute + comm) / (1 - pipeline bubble)

where the bubble is that of this project's lockstep executor (Schedule.lockstep_bubble_fraction: a tick
lasts as long as its slowest stage), not the textbook (P-1)/(M+P-1).

with no overlap of communication and computation (a pessimistic bound on the comm side, an optimistic
one on the compute side: peak FLOP/s). FLOPs are 6N per token plus attention
(jaxpar.train.costs.train_flops_per_token), plus the recomputed forward: remat 'full' adds a forward
(2N), 'save_dots' recomputes the attention scores and values. HBM bytes: the weights read three times
(forward, backward, recompute), the optimizer update reading and writing parameters, gradients and
optimizer state, the saved activations written once and read once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import numpy as np

from jaxpar.config import RunConfig, batch_split
from jaxpar.parallel import pipeline
from jaxpar.parallel.mesh import MESH_AXES
from jaxpar.plan.devices import DeviceKind
from jaxpar.train import costs


@functools.lru_cache(maxsize=256)
def lockstep_bubble(pipeline_cfg, stages: int, recompute: bool) -> float:
    """Idle share of jaxpar's lockstep pipeline executor (every tick lasts as long as its slowest
    stage), with a forward costing 1, a fused backward 2 (3 when it recomputes the forward) and a split
    one B = W = 1 (+1 on B when recomputing)."""
    schedule = pipeline_cfg.make_schedule(stages)
    costs = {
        "F": 1.0,
        "B": (3.0 if recompute else 2.0) if not schedule.split_backward else 1.0 + recompute,
        "W": 1.0,
    }
    return schedule.lockstep_bubble_fraction(costs)


@dataclasses.dataclass(frozen=True)
class StepCost:
    flops: float  # per device per step
    hbm_bytes: float
    comm_bytes: dict  # mesh axis -> bytes per device per step (module convention)
    wire_bytes: dict  # mesh axis -> bytes one device sends (ring factors applied)
    bubble: float
    compute_s: float
    comm_s: float
    step_s: float


def _ring(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(kind, (n - 1) / n)


def flops_per_device(run: RunConfig, sizes: Mapping[str, int]) -> float:
    m, t = run.model, run.train
    tokens = t.global_batch * t.seq_len
    per_token = costs.train_flops_per_token(m, t.seq_len)
    attention = per_token - costs.train_flops_per_token(m, 0)  # scores and values
    extra = {"full": per_token / 3, "save_dots": attention / 3}.get(costs.remat_family(m.remat), 0.0)
    return (per_token + extra) * tokens / math.prod(sizes.values())


def comm_terms(run: RunConfig, sizes: Mapping[str, int]) -> list[tuple[str, str, str, float]]:
    """(mesh axis, what, collective kind, bytes per device per step) of one train step."""
    m, t = run.model, run.train
    stages = sizes["pipeline"]
    act = np.dtype(m.dtype).itemsize
    terms = []
    # data, fsdp, tensor: the formulas the compiled HLO is tested against, on one stage's layers, with
    # expert parallelism's share of the batch split counted as data parallelism.
    stage_model = dataclasses.replace(
        m,
        n_layers=max(m.n_layers // stages, 1),
        remat=costs.remat_family(m.remat),
    )
    dft = {"data": sizes["data"] * sizes["expert"], "fsdp": sizes["fsdp"], "tensor": sizes["tensor"]}
    for term in costs.expected_terms(stage_model, dft, t.global_batch, t.seq_len // sizes["sequence"]):
        axis = term.name.split(":")[0]
        if axis in ("embedding", "norms"):  # reduced over tensor, then over the batch axes
            axis = next((a for a in ("tensor", "fsdp", "data") if dft[a] > 1), "data")
        terms.append((axis, term.name, term.kind, term.bytes))
    batch_shards, _ = batch_split(sizes)
    rows = t.global_batch // batch_shards
    if sizes["sequence"] > 1:
        tensor = sizes["tensor"]
        softmax_layers = (m.n_layers - m.linear_layers) // stages
        variant = m.sequence_parallel
        for layers, name in ((softmax_layers, variant), (m.linear_layers // stages, "lasp2")):
            if not layers:
                continue
            for what, kind, nbytes in costs.sequence_terms(
                name,
                batch=rows,
                seq_len=t.seq_len,
                sequence=sizes["sequence"],
                heads=max(m.n_heads // tensor, 1),
                kv_heads=max(m.n_kv_heads // tensor, 1),
                head_dim=m.head_dim,
                act_bytes=act,
                ulysses_degree=max(m.ulysses_degree, 1),
            ):
                terms.append(("sequence", f"sequence ({name}): {what}", kind, layers * nbytes))
    if sizes["expert"] > 1 and m.moe.experts:
        tokens = rows * t.seq_len // (sizes["sequence"] * sizes["tensor"])
        dispatch = tokens * m.moe.top_k * m.d_model * act
        terms.append(
            (
                "expert",
                "expert: all-to-all dispatch and combine, forward and backward",
                "all-to-all",
                4 * dispatch * m.n_layers // stages,
            )
        )
    if stages > 1:
        micro = run.pipeline.microbatches
        act_bytes = costs.activation_bytes(m, t.global_batch // micro, t.seq_len, sizes)
        program = pipeline.lower(run.pipeline.make_schedule(stages))
        terms.append(
            (
                "pipeline",
                "pipeline: the executor's activation and gradient ppermutes, every tick that sends",
                "collective-permute",
                costs.expected_ppermute_bytes(program, act_bytes)["total"],
            )
        )
        terms.append(
            (
                "pipeline",
                "pipeline: psums of the vocabulary-split embedding and head (forward and backward)",
                "all-reduce",
                4 * micro * act_bytes,
            )
        )
    return terms


def _axis_bandwidth(axis: str, sizes: Mapping[str, int], device: DeviceKind) -> float:
    """Link bandwidth of a mesh axis: devices of the axes at and inside it (MESH_AXES is outermost
    first) that fit one domain talk over the fast links, else over the network."""
    inner = math.prod(sizes[a] for a in MESH_AXES[MESH_AXES.index(axis) :])
    return device.link_bandwidth if inner <= device.domain else device.network_bandwidth


def step_cost(
    run: RunConfig, sizes: Mapping[str, int], memory: Mapping[str, int], device: DeviceKind
) -> StepCost:
    """The roofline of one step of `run` on a mesh of `sizes`, `memory` being fit.estimate's parts."""
    m = run.model
    flops = flops_per_device(run, sizes)
    weight_passes = 3 if m.remat == "full" else 2
    hbm = (
        weight_passes * memory["params"]
        + 2 * (memory["params"] + memory["grads"] + memory["opt_state"] + memory.get("host", 0))
        + 2 * memory["activations"]
    )
    comm, wire = dict.fromkeys(MESH_AXES, 0.0), dict.fromkeys(MESH_AXES, 0.0)
    for axis, _, kind, nbytes in comm_terms(run, sizes):
        comm[axis] += nbytes
        group = sizes[axis] * (sizes["expert"] if axis == "data" else 1)  # experts borrow data's devices
        wire[axis] += nbytes * _ring(kind, group if kind != "collective-permute" else 2)
    comm_s = sum(wire[a] / _axis_bandwidth(a, sizes, device) for a in MESH_AXES)
    # offloaded state and residuals cross PCIe (fit.estimate counts the bytes), at about the network's rate
    comm_s += memory.get("host_traffic", 0) / device.network_bandwidth
    compute_s = max(flops / device.peak_flops, hbm / device.hbm_bandwidth)
    bubble = 0.0
    if sizes["pipeline"] > 1:
        bubble = lockstep_bubble(run.pipeline, sizes["pipeline"], m.remat == "full")
    step_s = (compute_s + comm_s) / (1 - bubble)
    return StepCost(flops, hbm, comm, wire, bubble, compute_s, comm_s, step_s)
