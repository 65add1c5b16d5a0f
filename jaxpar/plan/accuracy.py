"""The planner against the compiler: predicted per-device memory (jaxpar.train.fit.estimate) next to
XLA's buffer assignment of the same train step (jaxpar.parallel.analysis.memory), and the planner's
ranking next to a ranking of compiled programs. Used by experiments/bench_plan.py and tests/test_plan.py;
needs as many devices as the meshes it compiles (8 simulated CPU devices)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import ml_collections

from jaxpar.config import OffloadConfig, RunConfig, from_config_dict, validate_run
from jaxpar.parallel import analysis
from jaxpar.parallel.mesh import make_mesh
from jaxpar.plan import search
from jaxpar.plan.devices import DeviceKind
from jaxpar.train import build, fit

# (name, preset of configs/lm.py, overrides): dense, MoE, pipeline, sequence parallel, linear and hybrid
# mixers, optimizers, remat policies, accumulation, batch sizes, meshes, offload; at most 8 devices.
CASES = (
    ("smoke", "smoke", {}),
    ("smoke remat=full", "smoke", {"model.remat": "full"}),
    ("smoke remat=save_dots", "smoke", {"model.remat": "save_dots"}),
    ("smoke batch 64", "smoke", {"train.global_batch": 64}),
    ("smoke accum 2", "smoke", {"train.grad_accum_steps": 2}),
    ("smoke dp8", "smoke", {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1}),
    ("smoke fsdp8", "smoke", {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}),
    ("smoke fsdp4 tp2 full", "smoke", {"mesh.data": 1, "mesh.fsdp": 4, "model.remat": "full"}),
    (
        "smoke tp8 seq 256",
        "smoke",
        {
            "mesh.data": 1,
            "mesh.fsdp": 1,
            "mesh.tensor": 8,
            "model.n_heads": 8,
            "model.n_kv_heads": 8,
            "model.head_dim": 16,
            "train.seq_len": 256,
        },
    ),
    ("small", "small", {}),
    ("small remat=full", "small", {"model.remat": "full"}),
    ("small remat=save_dots", "small", {"model.remat": "save_dots"}),
    (
        "small fsdp8 accum 2",
        "small",
        {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, "train.grad_accum_steps": 2},
    ),
    ("small dp4 tp2 full", "small", {"mesh.data": 4, "mesh.fsdp": 1, "model.remat": "full"}),
    ("moe_smoke", "moe_smoke", {}),
    ("moe_smoke remat=full", "moe_smoke", {"model.remat": "full"}),
    ("moe_smoke expert8", "moe_smoke", {"mesh.data": 1, "mesh.expert": 8}),
    ("moe_smoke capacity 1.25", "moe_smoke", {"model.moe.capacity_factor": 1.25}),
    ("long_smoke ring", "long_smoke", {}),
    ("long_smoke ring tp2", "long_smoke", {"mesh.data": 1, "mesh.tensor": 2}),
    ("long_smoke ring full", "long_smoke", {"model.remat": "full"}),
    ("long_smoke allgather", "long_smoke", {"model.sequence_parallel": "allgather"}),
    (
        "long_smoke ulysses seq2",
        "long_smoke",
        {"model.sequence_parallel": "ulysses", "mesh.data": 4, "mesh.sequence": 2},
    ),
    ("pipeline 1f1b M4", "smoke", {"mesh.pipeline": 2, "mesh.data": 2, "mesh.fsdp": 1}),
    (
        "pipeline 1f1b M8",
        "smoke",
        {"mesh.pipeline": 2, "mesh.data": 2, "mesh.fsdp": 1, "pipeline.microbatches": 8},
    ),
    (
        "pipeline gpipe M4",
        "smoke",
        {"mesh.pipeline": 2, "mesh.data": 2, "mesh.fsdp": 1, "pipeline.schedule": "gpipe"},
    ),
    (
        "pipeline 1f1b full",
        "smoke",
        {"mesh.pipeline": 2, "mesh.data": 2, "mesh.fsdp": 1, "model.remat": "full"},
    ),
    ("smoke soap", "smoke", {"optimizer.name": "soap"}),
    ("smoke muon", "smoke", {"optimizer.name": "muon"}),
    ("long_smoke linear (LASP-2)", "long_smoke", {"model.mixer": "linear"}),
    (
        "long_smoke hybrid",
        "long_smoke",
        {"model.mixer": "hybrid", "model.n_layers": 4, "model.softmax_every": 2},
    ),
    ("smoke offload optimizer state", "smoke", {"offload.optimizer_state": True}),
    (
        "small offload optimizer state fsdp8",
        "small",
        {"offload.optimizer_state": True, "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
    ),
    (
        "smoke offload params + opt state",
        "smoke",
        {"offload.params": True, "offload.optimizer_state": True, "model.remat": "save_dots"},
    ),
    (
        "small offload params fsdp8",
        "small",
        {"offload.params": True, "model.remat": "full", "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
    ),
    ("smoke remat=offload", "smoke", {"model.remat": "offload"}),
    ("small remat=offload", "small", {"model.remat": "offload"}),
    (
        "pipeline small P4",
        "small",
        {"mesh.pipeline": 4, "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 1, "pipeline.microbatches": 8},
    ),
)


def run_config(base: ml_collections.ConfigDict, overrides: Mapping[str, object]) -> RunConfig:
    """A config file's ConfigDict (e.g. configs/lm.py's get_config(preset)) with dotted overrides."""
    c = ml_collections.ConfigDict(base.to_dict())
    for key, value in overrides.items():
        node, parts = c, key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return from_config_dict(c)


def compiled_memory(run: RunConfig) -> tuple[dict, dict, object]:
    """(XLA's memory analysis of the train step, the mesh sizes, the compiled program) on this process's
    devices."""
    sizes = validate_run(run, jax.device_count())
    program = build.build(run, make_mesh(sizes))
    compiled = program.compile()
    return analysis.memory(compiled), sizes, compiled


def compare(run: RunConfig) -> dict:
    """Predicted and compiled bytes per device of one run, and the relative error of the total against
    XLA's peak estimate (arguments + outputs + temporaries - donated)."""
    start = time.perf_counter()
    measured, sizes, compiled = compiled_memory(run)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = fit.estimate(run, sizes)
    predict_s = time.perf_counter() - start
    # A backend without a separate host memory (CPU) reports host-resident buffers in its device
    # numbers: there the prediction to compare is device + host bytes.
    stats = compiled.memory_analysis()
    host_reported = stats.host_argument_size_in_bytes + stats.host_temp_size_in_bytes > 0
    compared = predicted["total"] + (0 if host_reported else predicted["host"])
    return {
        "mesh": {k: v for k, v in sizes.items() if v > 1},
        "predicted": predicted,
        "compiled": measured,
        "compared_bytes": compared,
        "host_reported_separately": host_reported,
        "error": compared / measured["peak_estimate"] - 1,
        "compile_s": compile_s,
        "predict_s": predict_s,
    }


def compiled_step_s(compiled, device: DeviceKind) -> tuple[float, float, float]:
    """The same roofline as jaxpar.plan.cost, fed with facts of the compiled program: its matmul FLOPs and
    the wire bytes of its collectives (all inside one domain of 8 devices). (step s, flops, wire bytes)"""
    flops = analysis.matmul_flops(compiled)
    wire = sum(op.wire_bytes for op in analysis.collective_ops(compiled))
    memory = analysis.memory(compiled)
    hbm = 2 * memory["argument_bytes"] + 2 * memory["temp_bytes"]
    return (
        max(flops / device.peak_flops, hbm / device.hbm_bandwidth) + wire / device.link_bandwidth,
        flops,
        wire,
    )


def exhaustive(
    run: RunConfig, bytes_limit: int, device: DeviceKind, remats=("none", "full"), max_pipeline: int = 1
) -> dict:
    """Every valid plan of `run` on this process's devices (meshes without sequence parallelism and with
    at most `max_pipeline` stages (1F1B, M = 2P) x remat; no accumulation), compiled:
    which fit by XLA's numbers, and which is fastest by the roofline on the compiled facts; next to the
    planner's ranking of the same plans."""
    n = jax.device_count()
    rows = []
    for sizes in search.meshes(run, n):
        if sizes["sequence"] > 1 or sizes["pipeline"] > max_pipeline:
            continue
        for candidate in search.variants(run, sizes, (OffloadConfig(),)):
            if candidate.model.remat not in remats or candidate.train.grad_accum_steps > 1:
                continue
            pipe = candidate.pipeline
            if sizes["pipeline"] > 1 and (
                pipe.microbatches != 2 * sizes["pipeline"] or pipe.schedule != "1f1b"
            ):
                continue
            plan = search.evaluate(candidate, n, bytes_limit, device)
            if plan.cost is None:
                continue
            memory, _, compiled = compiled_memory(candidate)
            step_s, flops, wire = compiled_step_s(compiled, device)
            rows.append(
                {
                    "plan": plan.overrides(),
                    "label": f"{plan.mesh_label()} remat={candidate.model.remat} "
                    + (
                        f"M={candidate.pipeline.microbatches}"
                        if sizes["pipeline"] > 1
                        else f"accum={candidate.train.grad_accum_steps}"
                    ),
                    "predicted_bytes": plan.memory["total"],
                    "predicted_step_s": plan.cost.step_s,
                    "predicted_fits": plan.fits,
                    "compiled_bytes": memory["peak_estimate"],
                    "compiled_step_s": step_s,
                    "compiled_flops": flops,
                    "compiled_wire_bytes": wire,
                    "compiled_fits": memory["peak_estimate"] <= bytes_limit,
                }
            )
    fitting = sorted((r for r in rows if r["compiled_fits"]), key=lambda r: r["compiled_step_s"])
    picks = sorted((r for r in rows if r["predicted_fits"]), key=lambda r: r["predicted_step_s"])
    top = picks[0] if picks else None
    rank = next(
        (i + 1 for i, r in enumerate(fitting) if top is not None and r["label"] == top["label"]), None
    )
    return {
        "plans": rows,
        "planner_pick": top["label"] if top else None,
        "compiled_best": fitting[0]["label"] if fitting else None,
        "pick_rank_among_compiled": rank,
        "pick_step_over_best": (top["compiled_step_s"] / fitting[0]["compiled_step_s"])
        if top and fitting
        else None,
        "fit_agreement": sum(r["predicted_fits"] == r["compiled_fits"] for r in rows) / max(len(rows), 1),
    }
