"""Host offload on 8 simulated CPU devices (the work behind experiments/bench_offload.py): for each
config.offload choice, the compiled program's memory (XLA's analysis, device and host fields), the
planner's predicted device and host bytes, the losses of the first steps against no offload, and the step
time relative to no offload (contenders interleaved in one process, compile timed apart)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
from ml_collections import ConfigDict

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.bench.optimizers import Contender, fixed_batches, interleaved_step_times, train_curve
from jaxpar.config import OffloadConfig, from_config_dict, validate_run
from jaxpar.parallel import analysis
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, fit

DEVICES = 8
MiB = 2**20
# label: (config.offload, model.remat); the first is the baseline every ratio is against. save_dots
# throughout: offloaded parameters need rematerialisation, and remat 'offload' is save_dots to the host.
CHOICES = {
    "none": (OffloadConfig(), "save_dots"),
    "opt state": (OffloadConfig(optimizer_state=True), "save_dots"),
    "params": (OffloadConfig(params=True), "save_dots"),
    "params + opt state": (OffloadConfig(optimizer_state=True, params=True), "save_dots"),
    "remat=offload": (OffloadConfig(), "offload"),
}


def program_for(config: ConfigDict, offload: OffloadConfig, remat: str) -> build_lib.TrainProgram:
    run = from_config_dict(config)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, remat=remat), offload=offload)
    return build_lib.build(run, make_mesh(validate_run(run, jax.device_count())))


def measure(config: ConfigDict, steps: int, rounds: int, timed_steps: int) -> dict:
    rows, contenders = [], []
    for label, (offload, remat) in CHOICES.items():
        program = program_for(config, offload, remat)
        start = time.perf_counter()
        compiled = program.compile()
        compile_s = time.perf_counter() - start
        stats = compiled.memory_analysis()
        predicted = fit.estimate(program.run, dict(program.mesh.shape), program.abstract)
        losses, state = train_curve(program, fixed_batches(program.run, steps))
        contenders.append(Contender(label, program, state))
        rows.append(
            {
                "label": label,
                "remat": program.run.model.remat,
                "compile_s": compile_s,
                "compiled": analysis.memory(compiled),
                "compiled_host_bytes": int(stats.host_argument_size_in_bytes + stats.host_temp_size_in_bytes),
                "predicted": predicted,
                "losses": losses,
            }
        )
    batch = fixed_batches(contenders[0].program.run, 1)[0]
    times = interleaved_step_times(contenders, batch, rounds, timed_steps)
    for row in rows:
        row["step_s"] = times[row["label"]]
    return {"rows": rows, "mesh": dict(contenders[0].program.mesh.shape)}


def run(out: str, config: ConfigDict, steps: int, rounds: int = 5, timed_steps: int = 3) -> None:
    load_before = os.getloadavg()
    results = measure(config, steps, rounds, timed_steps)
    results.update(
        command=" ".join(["python", *sys.argv]),
        machine=machine.describe(),
        load_average_before_after=[load_before, os.getloadavg()],
        config=config.to_dict(),
        steps=steps,
        rounds=rounds,
        timed_steps=timed_steps,
    )
    common.write_results(out, results)
    render(out)


def readme(results: dict) -> str:
    rows, m = results["rows"], results["machine"]
    base = rows[0]
    load = results["load_average_before_after"]
    lines = [
        "# Host offload (config.offload, model.remat='offload')",
        "",
        f"`{results['command']}` on {machine.summary(m)}; load average "
        f"{load[0][0]:.2f} before, {load[1][0]:.2f} after (a shared 2-core machine: step-time ratios within "
        f"about 20% of 1 are noise). Mesh {results['mesh']}, {results['steps']} steps of the same batches "
        "per choice (the full config in results.json).",
        "",
        "Compiled: XLA's memory analysis of the train step per device (arguments + outputs + temporaries - "
        "donated). The CPU backend keeps pinned-host buffers in the same memory and reports them with the "
        "device's (host fields "
        + ("non-zero" if any(r["compiled_host_bytes"] for r in rows) else "zero")
        + " here), so on this machine the compiled total cannot show the saving; the planner's split "
        "(jaxpar.train.fit: device total, host) is what a GPU would hold, and the memory kinds of the "
        "step's outputs are checked in tests/test_offload.py. Step time: median of "
        f"{results['rounds']} interleaved rounds of {results['timed_steps']} steps, ratio to `none` in this "
        "run; on CPU host and device memory are the same DRAM, so the ratio shows the cost of the extra "
        "copies, not of a PCIe link.",
        "",
        "| offload | remat | compiled MiB | predicted device MiB | predicted host MiB "
        "| host MiB moved per step | losses equal to none | step s | step time / none | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted"]
        lines.append(
            f"| {r['label']} | {r['remat']} | {r['compiled']['peak_estimate'] / MiB:.2f} | "
            f"{p['total'] / MiB:.2f} | {p['host'] / MiB:.2f} | {p.get('host_traffic', 0) / MiB:.2f} | "
            f"{'yes' if r['losses'] == base['losses'] else 'NO'} | {r['step_s']:.4f} | "
            f"{r['step_s'] / base['step_s']:.2f} | {r['compile_s']:.1f} |"
        )
    lines += [
        "",
        f"Losses of `none` over the {results['steps']} steps: "
        + ", ".join(f"{x:.4f}" for x in base["losses"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def render(out: str) -> None:
    common.write_readme(out, readme(common.read_results(out)))
