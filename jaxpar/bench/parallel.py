"""Collective bytes, memory and FLOPs of the train step under each parallel strategy, read off the
compiled program (jaxpar/parallel/analysis.py) and checked against the analytic model in
jaxpar/train/costs.py (the work behind experiments/bench_parallel.py).

Part 1 compiles a model on 8 simulated CPU devices for DP, FSDP, TP and two combinations. Part 2 compiles
real-size presets for a larger mesh (64) in a child process that simulates that many CPU devices (the
count is fixed when jax starts), from abstract inputs only, so nothing is allocated. Writes results.json
and README.md (tables).
"""

import dataclasses
import time

import jax

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import MeshConfig, RunConfig, from_config_dict, validate_run
from jaxpar.parallel import analysis
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, costs

PART1_DEVICES = 8
# name -> (mesh axis sizes, model overrides). smoke has n_kv_heads=2, so tensor=4 needs 4 KV heads.
STRATEGIES = {
    "dp8": (dict(data=8), {}),
    "fsdp8": (dict(data=1, fsdp=8), {}),
    "dp4_tp2": (dict(data=4, tensor=2), {}),
    "dp2_tp4": (dict(data=2, tensor=4), {"n_kv_heads": 4}),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), {}),
    "fsdp4_tp2": (dict(data=1, fsdp=4, tensor=2), {}),
}


def backend_options() -> dict:
    """How this backend compiles collectives, for the analytic model: the CPU backend keeps GSPMD's
    all-reduce + dynamic-slice instead of a reduce-scatter, and upcasts bf16 to f32 (so every
    collective moves 4-byte elements)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"reduce_scatter_as_all_reduce": True, "param_bytes": 4, "act_bytes": 4}


def measure(run: RunConfig) -> dict:
    """Compile the train step for `run` on this process's devices; everything read off it."""
    sizes = validate_run(run, jax.device_count())
    mesh = make_mesh(sizes)
    start = time.perf_counter()
    program = build_lib.build(run, mesh)
    compiled, abstract = program.compile(), program.abstract
    compile_s = time.perf_counter() - start
    ops = analysis.collective_ops(compiled)
    measured = analysis.collective_bytes(compiled)
    options = backend_options()
    expected = costs.expected_collective_bytes(
        run.model, sizes, run.train.global_batch, run.train.seq_len, **options
    )
    terms = costs.expected_terms(run.model, sizes, run.train.global_batch, run.train.seq_len, **options)
    return {
        "mesh": {axis: size for axis, size in sizes.items() if size > 1},
        "devices": jax.device_count(),
        "global_batch": run.train.global_batch,
        "seq_len": run.train.seq_len,
        "n_params": run.model.n_params,
        "collective_bytes": {
            "measured": measured,
            "expected": expected,
            "ratio": measured["total"] / max(expected["total"], 1),
        },
        "measured_wire_bytes": sum(op.wire_bytes for op in ops),
        "expected_terms": [dataclasses.asdict(term) for term in terms],
        "measured_ops": [dict(dataclasses.asdict(op), total_bytes=op.total_bytes) for op in ops],
        "state_bytes_per_device": analysis.state_bytes_per_device(abstract),
        "memory": analysis.memory(compiled),
        "matmul_flops_per_device": analysis.matmul_flops(compiled),
        "xla_cost_analysis_flops_per_device": analysis.flops(compiled),
        "compile_s": round(compile_s, 2),
    }


def run_strategies(base: RunConfig) -> dict:
    if jax.device_count() != PART1_DEVICES:
        raise SystemExit(
            f"part 1 needs {PART1_DEVICES} devices, found {jax.device_count()}; unset the "
            "device count in XLA_FLAGS and let this script set it."
        )
    results = {}
    for name, (mesh, overrides) in STRATEGIES.items():
        model = dataclasses.replace(base.model, **overrides)
        results[name] = dict(
            measure(dataclasses.replace(base, mesh=MeshConfig(**mesh), model=model)),
            model_overrides=overrides,
        )
        ratio = results[name]["collective_bytes"]["ratio"]
        print(f"{name:14s} measured/expected collective bytes {ratio:.3f}")
    return results


def measure_presets(specs: list[str]) -> dict:
    """preset name -> `measure` of it, on this process's devices: the child side of `run_presets_in_child`."""
    return {
        spec.partition(":")[2]: measure(from_config_dict(common.load_config_dict(spec))) for spec in specs
    }


def run_presets_in_child(specs: list[str], devices: int) -> dict:
    """The presets, compiled in a child process that simulates `devices` CPU devices."""
    return common.run_in_child(__name__, [specs], devices)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f}"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.2f}"


def _mesh(sizes: dict) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in sizes.items())


def _collective_table(results: dict, unit) -> list[str]:
    kinds = [
        k
        for k in analysis.KINDS
        if any(
            r["collective_bytes"]["measured"][k] or r["collective_bytes"]["expected"][k]
            for r in results.values()
        )
    ]
    lines = [
        "| strategy | mesh | "
        + " | ".join(f"{k} meas / exp" for k in kinds)
        + " | total measured | total expected | ratio |",
        "|---" * (len(kinds) + 5) + "|",
    ]
    for name, r in results.items():
        m, e = r["collective_bytes"]["measured"], r["collective_bytes"]["expected"]
        cells = [f"{unit(m[k])} / {unit(e[k])}" for k in kinds]
        ratio = r["collective_bytes"]["ratio"]
        lines.append(
            f"| {name} | {_mesh(r['mesh'])} | "
            + " | ".join(cells)
            + f" | {unit(m['total'])} | {unit(e['total'])} | **{ratio:.3f}** |"
        )
    return lines


def _resource_table(results: dict, unit, unit_name) -> list[str]:
    lines = [
        f"| strategy | params / device ({unit_name}) | optimizer state / device ({unit_name}) | "
        f"arguments ({unit_name}) | temporaries ({unit_name}) | peak estimate ({unit_name}) | "
        "matmul GFLOP / device | XLA cost-analysis GFLOP / device | compile (s) |",
        "|---" * 9 + "|",
    ]
    for name, r in results.items():
        s, mem = r["state_bytes_per_device"], r["memory"]
        lines.append(
            f"| {name} | {unit(s['params'])} | {unit(s['opt_state'])} | "
            f"{unit(mem['argument_bytes'])} | {unit(mem['temp_bytes'])} | "
            f"{unit(mem['peak_estimate'])} | "
            f"{r['matmul_flops_per_device'] / 1e9:,.2f} | "
            f"{r['xla_cost_analysis_flops_per_device'] / 1e9:,.2f} | {r['compile_s']} |"
        )
    return lines


def _largest_excess_ops(r: dict, n: int = 4) -> str:
    """The largest measured ops of the kinds that exceed their expectation: where to look first."""
    measured, expected = r["collective_bytes"]["measured"], r["collective_bytes"]["expected"]
    over = {kind for kind in analysis.KINDS if measured[kind] > 1.1 * expected[kind]}
    ops = sorted((op for op in r["measured_ops"] if op["kind"] in over), key=lambda op: -op["total_bytes"])[
        :n
    ]
    return "; ".join(
        f"{op['kind']} {_mb(op['total_bytes'])} MB ({op['op_name'].removeprefix('jit(train_step)/')})"
        for op in ops
    )


def readme(results: dict) -> str:
    m = results["machine"]
    smoke, presets = results["strategies"], results["presets"]
    one_smoke, one_preset = next(iter(smoke.values())), next(iter(presets.values()))
    overrides = ", ".join(
        f"{name}: {r['model_overrides']}" for name, r in smoke.items() if r["model_overrides"]
    )
    off = {name: r for name, r in smoke.items() if abs(r["collective_bytes"]["ratio"] - 1) > 0.10}
    lines = [
        "# Collective bytes, memory and FLOPs per parallel strategy",
        "",
        f"Generated by `python experiments/bench_parallel.py` on {m['date']}: {m['cpu']}, "
        f"{m['cores']} cores, backend {m['backend']}; jax {m['jax']}, jaxlib {m['jaxlib']}, "
        f"flax {m['flax']}. Raw numbers, the analytic terms and every measured collective op: "
        "`results.json`. The gaps explained: `FINDINGS.md`.",
        "",
        "Bytes are per device per train step, in the convention of `jaxpar/parallel/analysis.py`: the full "
        "buffer on the wide side of each collective (all-gather: result; reduce-scatter, all-reduce, "
        "all-to-all, collective-permute: operand), ops in the layer scan counted once per layer. *Expected* "
        "is the analytic model (`costs.expected_terms`) for the CPU backend: reduce-scatters labelled "
        "all-reduce (XLA:CPU compiles them as all-reduce + dynamic-slice) and bf16 counted as f32 (XLA:CPU "
        "upcasts it). Ratio = measured total / expected total.",
        "",
        f"## Part 1: {results['config']} on {one_smoke['devices']} simulated CPU devices",
        "",
        f"Global batch {one_smoke['global_batch']}, sequence {one_smoke['seq_len']}, "
        f"{one_smoke['n_params']:,} parameters. Model overrides: {overrides or 'none'}.",
        "",
        "Collective bytes (MB = 2^20 bytes):",
        "",
        *_collective_table(smoke, _mb),
        "",
        "Memory (XLA buffer assignment, per device) and FLOPs per device. Matmul FLOPs are counted from the "
        "HLO with the layer loop's trip count (`analysis.matmul_flops`); XLA's cost analysis counts the "
        "loop body once, so it undercounts by about the depth.",
        "",
        *_resource_table(smoke, _mb, "MB"),
        "",
    ]
    if off:
        lines += ["Outside 10% (see FINDINGS.md), the largest ops of the kinds over their expectation:", ""]
        lines += [f"- {name}: {_largest_excess_ops(r)}" for name, r in off.items()] + [""]
    lines += [
        f"## Part 2: real-size presets, compiled for {one_preset['devices']} simulated CPU devices",
        "",
        "Each preset is compiled (not only lowered) for its own mesh in a child process that simulates "
        f"{one_preset['devices']} CPU devices, from `jax.ShapeDtypeStruct` inputs, so nothing is allocated. "
        "Parameter and optimizer bytes come from the shard shapes of the abstract state; memory from "
        "XLA:CPU's buffer assignment (indicative of an accelerator's, not equal to it). Parameters: "
        + ", ".join(f"{name} {r['n_params'] / 1e9:.2f} B" for name, r in presets.items())
        + ".",
        "",
        "Collective bytes (GB = 2^30 bytes):",
        "",
        *_collective_table(presets, _gb),
        "",
        "Memory (per device) and FLOPs per device:",
        "",
        *_resource_table(presets, _gb, "GB"),
    ]
    return "\n".join(lines) + "\n"


def run(out: str, config: RunConfig, config_name: str, presets: list[str], preset_devices: int) -> None:
    """Part 1 for `config` (named `config_name` in the report) on this process's 8 devices, part 2 for the
    `presets` ('configs/lm.py:llama_7b') on `preset_devices` in a child; results.json and README.md into
    `out`."""
    results = {
        "machine": machine.describe(),
        "config": config_name,
        "strategies": run_strategies(config),
        "presets": run_presets_in_child(presets, preset_devices),
    }
    common.write_results(out, results)
    common.write_readme(out, readme(results))
    print(f"wrote {out}/results.json and {out}/README.md")


def render(out: str) -> None:
    """README.md again from `out`/results.json; nothing measured."""
    common.write_readme(out, readme(common.read_results(out)))


if __name__ == "__main__":  # the presets' child process: run_in_child's arguments in, results out
    common.child_main(measure_presets)
