"""Optimizer benchmarks on 8 simulated CPU devices (the work behind experiments/bench_optimizers.py):
loss after N steps for AdamW, Muon, GaLore and SOAP, each at its best of three learning rates, on the same
batches of the smoke corpus; optimizer-state bytes per device; step time vs AdamW measured interleaved in
one process (compile time apart); collective bytes per step of the compiled step vs the analytic count
of the optimizer's own communication.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time

import jax
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import from_config_dict
from jaxpar.parallel import analysis
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, data, step as step_lib
from jaxpar.train.optimizers import matrices

DEVICES = 8
CONTENDERS = ("adamw", "muon", "galore_adamw", "soap")
LEARNING_RATES = (1e-3, 3e-3, 1e-2)
MB = 2**20


# Training runs use this mesh (the same math as any other: tests/test_optimizers.py); communication and
# memory are compiled on the config's own mesh. Runs here aborted in XLA:CPU's in-process collectives (a
# 40 s rendezvous timeout) while a whole run's steps were queued asynchronously; with at most two steps
# in flight (train_curve) they complete. The sharded mesh was not tried again for training.
TRAIN_MESH = {"data": 8, "fsdp": 1, "tensor": 1}


def run_config(config: ConfigDict, name: str, learning_rate: float, steps: int, mesh=None, **optimizer):
    c = config.to_dict()
    c["mesh"].update(mesh or {})
    c["optimizer"].update(name=name, learning_rate=learning_rate, **optimizer)
    c["train"]["steps"] = steps
    return from_config_dict(c)


def fixed_batches(run, steps: int) -> list[dict]:
    """The first `steps` training batches of the run's corpus: every contender sees the same tokens."""
    batches = data.make_batches(
        run.data, split="train", seq_len=run.train.seq_len, batch_size=run.train.global_batch
    )
    return [next(batches) for _ in range(steps)]


def muon_analytic_bytes(program) -> dict[str, int]:
    """The gathered Newton-Schulz's own communication per device and step: every Muon matrix's momentum
    gathered whole over the mesh axes that split its matrix axes (s shards): the gathered bytes (module
    convention: the result) and the wire bytes of a ring ((1 - 1/s) of that)."""
    mesh, module, wire = program.mesh, 0, 0.0
    params, shardings = program.abstract.params, program.shardings.params
    for leaf, layout, sharding in zip(
        jax.tree.leaves(params), matrices.leaf_layouts(params), jax.tree.leaves(shardings)
    ):
        if layout is None:
            continue
        whole = jax.sharding.NamedSharding(mesh, matrices.gathered_spec(layout))
        itemsize = np.dtype(leaf.dtype).itemsize
        gathered = math.prod(whole.shard_shape(layout.view_shape)) * itemsize
        shards = gathered // (math.prod(sharding.shard_shape(leaf.shape)) * itemsize)
        if shards > 1:
            module += gathered
            wire += gathered * (1 - 1 / shards)
    return {"module": int(module), "wire": int(wire)}


def collectives(compiled) -> dict[str, int]:
    ops = analysis.collective_ops(compiled)
    out = analysis.totals_by_kind((op.kind, op.total_bytes) for op in ops)
    out["wire_total"] = sum(op.wire_bytes for op in ops)
    return out


@dataclasses.dataclass
class Contender:
    label: str
    program: build_lib.TrainProgram
    state: object = None


def train_curve(program, batches) -> tuple[list[float], object]:
    sharding = step_lib.batch_sharding(program.mesh)
    with jax.set_mesh(program.mesh):
        state, losses = program.init(), []
        for batch in batches:
            state, metrics = program.train_step(state, jax.device_put(batch, sharding))
            losses.append(metrics["loss"])
            if len(losses) > 1:  # at most two steps in flight, as the training loop does: a deep queue
                losses[-2].block_until_ready()  # of async steps deadlocked XLA:CPU's collectives here
    return [float(x) for x in losses], state


def time_steps(contender: Contender, batch, steps: int) -> float:
    """Seconds per step over `steps` steps (the state is carried on, so donation keeps working)."""
    with jax.set_mesh(contender.program.mesh):
        batch = jax.device_put(batch, step_lib.batch_sharding(contender.program.mesh))
        jax.block_until_ready(contender.state)
        start = time.perf_counter()
        for _ in range(steps):
            contender.state, metrics = contender.program.train_step(contender.state, batch)
            metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / steps


def sweep(config: ConfigDict, steps: int, optimizer: dict) -> tuple[dict, dict]:
    """Every contender at every learning rate: (curves, best per contender with its program and state)."""
    curves, best = {}, {}
    batches = None
    for name in CONTENDERS:
        for lr in LEARNING_RATES:
            run = run_config(config, name, lr, steps, TRAIN_MESH, **optimizer)
            batches = batches or fixed_batches(run, steps)
            mesh = make_mesh(run.mesh.resolve(jax.device_count()))
            program = build_lib.build(run, mesh)
            start = time.perf_counter()
            program.compile()
            compile_s = time.perf_counter() - start
            losses, state = train_curve(program, batches)
            final = float(np.mean(losses[-10:]))
            curves.setdefault(name, {})[str(lr)] = losses
            logging.info("%s lr=%g: final loss (mean of last 10) %.4f", name, lr, final)
            if not math.isfinite(final):
                continue
            if name not in best or final < best[name]["final_loss"]:
                best[name] = {
                    "learning_rate": lr,
                    "final_loss": final,
                    "compile_s_train_mesh": compile_s,
                    "program": program,
                    "state": state,
                }
    return curves, best


def compiled_facts(config: ConfigDict, name: str, lr: float, steps: int, **optimizer) -> dict:
    """Compile time, collective bytes, memory and state bytes of the step on the config's own mesh
    (compiled only, never run)."""
    run = run_config(config, name, lr, steps, **optimizer)
    program = build_lib.build(run, make_mesh(run.mesh.resolve(jax.device_count())))
    start = time.perf_counter()
    compiled = program.compile()
    return {
        "compile_s": time.perf_counter() - start,
        "collectives": collectives(compiled),
        "memory": analysis.memory(compiled),
        "state_bytes": analysis.state_bytes_per_device(program.abstract),
        "muon_analytic_bytes": muon_analytic_bytes(program) if name == "muon" else None,
        "mesh": dict(program.mesh.shape),
    }


def interleaved_step_times(contenders: list[Contender], batch, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each contender, contenders alternating within every round."""
    for c in contenders:  # warm: the first call after a training run may re-place the batch
        time_steps(c, batch, 1)
    times = {c.label: [] for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            times[c.label].append(time_steps(c, batch, steps))
    return {label: statistics.median(ts) for label, ts in times.items()}


def run_compiled_only(out: str, config: ConfigDict, steps: int) -> None:
    """Only what compiling measures (state bytes, collectives, memory, compile time), at the first of
    LEARNING_RATES: no step is run. The fallback when runs abort (see TRAIN_MESH)."""
    optimizer = {"galore_rank": config.model.d_model // 4}
    wall, load_before = time.perf_counter(), os.getloadavg()
    facts = {name: compiled_facts(config, name, LEARNING_RATES[0], steps, **optimizer) for name in CONTENDERS}
    sharded = compiled_facts(config, "muon", LEARNING_RATES[0], steps, muon_layout="sharded", **optimizer)
    adamw = facts["adamw"]
    extra = lambda f: {
        "extra_collective_bytes": f["collectives"]["total"] - adamw["collectives"]["total"],
        "extra_wire_bytes": f["collectives"]["wire_total"] - adamw["collectives"]["wire_total"],
    }
    rows = {
        name: f
        | extra(f)
        | {"opt_state_vs_adamw": f["state_bytes"]["opt_state"] / adamw["state_bytes"]["opt_state"]}
        for name, f in facts.items()
    }
    results = {
        "machine": machine.describe() | {"optax": optax.__version__},
        "load_average_before_after": [load_before, os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiled_only": True,
        "config": {"preset": "smoke", "steps": steps, **optimizer},
        "rows": rows,
        "muon_sharded": sharded | extra(sharded),
        "muon_analytic_bytes": facts["muon"]["muon_analytic_bytes"],
        "wall_s": time.perf_counter() - wall,
    }
    common.write_results(out, results)
    render(out)


def run(out: str, config: ConfigDict, steps: int, rounds: int = 5, timed_steps: int = 5) -> None:
    # Refreshes are rare: every device repeats each matrix's eigh, and on 8 simulated devices sharing 2
    # cores one SOAP refresh of the smoke model took about a minute.
    optimizer = {
        "galore_rank": config.model.d_model // 4,
        "galore_update_every": max(steps // 2, 1),
        "soap_precondition_every": steps,
    }
    wall = time.perf_counter()
    load_before = os.getloadavg()
    curves, best = sweep(config, steps, optimizer)

    contenders = [Contender(name, best[name]["program"], best[name]["state"]) for name in best]
    batch = fixed_batches(best["adamw"]["program"].run, 1)[0]
    step_s = interleaved_step_times(contenders, batch, rounds, timed_steps)
    for name in best:
        best[name] |= compiled_facts(config, name, best[name]["learning_rate"], steps, **optimizer)
    # Muon with the compiler's layout (no gather): communication only.
    sharded = compiled_facts(
        config, "muon", best["muon"]["learning_rate"], steps, muon_layout="sharded", **optimizer
    )

    adamw = best["adamw"]
    rows = {}
    for name, b in best.items():
        rows[name] = {k: v for k, v in b.items() if k not in ("program", "state")} | {
            "step_s": step_s[name],
            "step_time_vs_adamw": step_s[name] / step_s["adamw"],
            "opt_state_vs_adamw": b["state_bytes"]["opt_state"] / adamw["state_bytes"]["opt_state"],
            "extra_collective_bytes": b["collectives"]["total"] - adamw["collectives"]["total"],
            "extra_wire_bytes": b["collectives"]["wire_total"] - adamw["collectives"]["wire_total"],
        }
    sharded |= {
        "extra_collective_bytes": sharded["collectives"]["total"] - adamw["collectives"]["total"],
        "extra_wire_bytes": sharded["collectives"]["wire_total"] - adamw["collectives"]["wire_total"],
    }
    run0 = run_config(config, "adamw", 1e-3, steps)
    results = {
        "machine": machine.describe() | {"optax": optax.__version__},
        "load_average_before_after": [load_before, os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": {
            "preset": "smoke",
            "mesh": dataclasses.asdict(run0.mesh),
            "global_batch": run0.train.global_batch,
            "seq_len": run0.train.seq_len,
            "steps": steps,
            "learning_rates": LEARNING_RATES,
            **optimizer,
        },
        "rows": rows,
        "muon_sharded": sharded,
        "muon_analytic_bytes": best["muon"]["muon_analytic_bytes"],
        "train_mesh": TRAIN_MESH,
        "curves": curves,
        "timing": {"rounds": rounds, "steps_per_round": timed_steps},
        "wall_s": time.perf_counter() - wall,
    }
    common.write_results(out, results)
    render(out)


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in results["rows"].items():
        losses = np.asarray(results["curves"][name][str(row["learning_rate"])])
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")
        ax.plot(np.arange(len(smooth)) + 5, smooth, label=f"{name} (lr {row['learning_rate']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-step mean)")
    ax.set_title("smoke preset, 8 simulated CPU devices, same batches")
    ax.legend()
    common.save_figure(fig, path, dpi=110)


def readme_compiled_only(results: dict) -> str:
    rows, m = results["rows"], results["machine"]
    lines = [
        "# Optimizers: AdamW, Muon, GaLore, SOAP (compiled facts only)",
        "",
        f"`python experiments/bench_optimizers.py --compiled_only` on {machine.summary(m)}; "
        f"optax {m['optax']}; "
        f"load average before {results['load_average_before_after'][0]}, after "
        f"{results['load_average_before_after'][1]}.",
        "",
        "Compiled facts only: no loss, no step time (see the full run for those).",
        "",
        f"Config `configs/lm.py:smoke` compiled on mesh {rows['adamw']['mesh']} (8 simulated CPU devices). "
        "Bytes per device; collective bytes per step in the module convention of "
        "`jaxpar/parallel/analysis.py` (wire: what a ring sends).",
        "",
        "| optimizer | opt-state MB/device | vs AdamW | compile s | temporaries MB | collectives MB/step | "
        "extra vs AdamW (wire) MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in list(rows.items()) + [("muon, sharded NS", results["muon_sharded"])]:
        lines.append(
            f"| {name} | {r['state_bytes']['opt_state'] / MB:.3f} | "
            f"{r['state_bytes']['opt_state'] / rows['adamw']['state_bytes']['opt_state']:.2f} | "
            f"{r['compile_s']:.1f} | {r['memory']['temp_bytes'] / MB:.2f} | "
            f"{r['collectives']['total'] / MB:.2f} | {r['extra_collective_bytes'] / MB:.2f} "
            f"({r['extra_wire_bytes'] / MB:.2f}) |"
        )
    a, s = results["muon_analytic_bytes"], results["muon_sharded"]
    lines += [
        "",
        "Muon's Newton-Schulz communication, gathered layout (default): analytically "
        f"{a['module'] / MB:.2f} MB (module convention) = {a['wire'] / MB:.2f} MB on the wire per device and "
        f"step; measured extra over AdamW {rows['muon']['extra_collective_bytes'] / MB:.2f} MB "
        f"({rows['muon']['extra_wire_bytes'] / MB:.2f} MB wire): XLA gathers over fsdp and tensor in two "
        "2-way steps, 1.5x the one-step count in the module convention, the same wire bytes. Sharded layout "
        f"(compiler-partitioned matmuls): {s['extra_collective_bytes'] / MB:.2f} MB "
        f"({s['extra_wire_bytes'] / MB:.2f} MB wire) extra.",
        "",
    ]
    return "\n".join(lines)


def readme(results: dict) -> str:
    cfg, rows, m = results["config"], results["rows"], results["machine"]
    lines = [
        "# Optimizers: AdamW, Muon, GaLore, SOAP",
        "",
        f"`python experiments/bench_optimizers.py` on {machine.summary(m)}; optax {m['optax']}. "
        f"Load average (1, 5, 15 min) before {results['load_average_before_after'][0]}, after "
        f"{results['load_average_before_after'][1]}; the whole run took {results['wall_s'] / 60:.1f} min; "
        f"XLA_FLAGS={results['xla_flags']!r}.",
        "",
        f"Config `configs/lm.py:smoke`, 8 simulated CPU devices. Losses and step times: trained on mesh "
        f"{results['train_mesh']} (see TRAIN_MESH in jaxpar/bench/optimizers.py); compile time, memory "
        "and collectives: the "
        f"step compiled on the config's mesh {results['rows']['adamw']['mesh']}. Global batch "
        f"{cfg['global_batch']} x {cfg['seq_len']} tokens, {cfg['steps']} steps, the same batches for "
        f"every run; learning rates {list(cfg['learning_rates'])} each, the best (lowest mean loss over "
        f"the last 10 steps) shown. GaLore rank {cfg['galore_rank']}, projection refreshed every "
        f"{cfg['galore_update_every']} steps, SOAP's eigenbasis every {cfg['soap_precondition_every']}. "
        f"Step times: medians of {results['timing']['rounds']} rounds "
        f"of {results['timing']['steps_per_round']} steps, contenders alternating within each round, in one "
        "process; a ratio is against AdamW in the same rounds. Bytes are per device; collective bytes per "
        "step in the module convention of `jaxpar/parallel/analysis.py` (wire: what a ring sends).",
        "",
        "| optimizer | best lr | loss (last 10) | opt-state MB/device | vs AdamW | step ms | vs AdamW | "
        "compile s | collectives MB/step | extra vs AdamW (wire) MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['learning_rate']:g} | {r['final_loss']:.4f} | "
            f"{r['state_bytes']['opt_state'] / MB:.3f} | {r['opt_state_vs_adamw']:.2f} | "
            f"{r['step_s'] * 1e3:.1f} | {r['step_time_vs_adamw']:.2f} | {r['compile_s']:.1f} | "
            f"{r['collectives']['total'] / MB:.2f} | {r['extra_collective_bytes'] / MB:.2f} "
            f"({r['extra_wire_bytes'] / MB:.2f}) |"
        )
    s = results["muon_sharded"]
    lines.append(
        f"| muon, sharded NS | (muon's) | - | {s['state_bytes']['opt_state'] / MB:.3f} | - | "
        f"- | - | {s['compile_s']:.1f} | "
        f"{s['collectives']['total'] / MB:.2f} | {s['extra_collective_bytes'] / MB:.2f} "
        f"({s['extra_wire_bytes'] / MB:.2f}) |"
    )
    a = results["muon_analytic_bytes"]
    lines += [
        "",
        "Muon's Newton-Schulz communication. Gathered (the default): each Muon matrix's momentum is "
        "gathered whole once per step, analytically "
        f"{a['module'] / MB:.2f} MB (module convention) = {a['wire'] / MB:.2f} MB on the wire per device; "
        f"measured extra over AdamW: {rows['muon']['extra_collective_bytes'] / MB:.2f} MB "
        f"({rows['muon']['extra_wire_bytes'] / MB:.2f} MB wire). XLA gathers over fsdp and tensor in two "
        "2-way steps, whose results add to 1.5x the one-step count in the module convention but send the "
        "same wire bytes. Sharded (the compiler partitions the matmuls of all iterations): "
        f"{s['extra_collective_bytes'] / MB:.2f} MB ({s['extra_wire_bytes'] / MB:.2f} MB wire) extra.",
        "",
        "![loss vs step](loss.png)",
        "",
    ]
    return "\n".join(lines)


def render(out: str) -> None:
    """README.md and loss.png again from `out`/results.json; nothing measured."""
    results = common.read_results(out)
    if results.get("compiled_only"):
        common.write_readme(out, readme_compiled_only(results))
        return
    plot(results, os.path.join(out, "loss.png"))
    common.write_readme(out, readme(results))
