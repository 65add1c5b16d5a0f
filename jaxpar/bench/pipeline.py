"""Pipeline schedules: timelines, bubble fractions against theory, per-device memory from compiled
memory analysis, and ppermute bytes per step against the analytic count (the work behind
experiments/bench_pipeline.py).

Part 1 (pure Python): every schedule's table drawn as a timeline PNG, its bubble fraction next to the
published formula, and the lockstep bubble when actions cost what they cost.
Part 2: matmul FLOPs of each action (F, fused B, ZB's B and W, the loss head) read off compiled
single-action programs of MODEL; those costs give the lockstep bubble, and the head's placement (split
over the vocabulary across all stages vs all on the last stage) is compared with them.
Part 3: the pipelined loss-and-gradient program compiled for 8 simulated CPU devices (pipeline=4 x
data=2): memory analysis for GPipe / 1F1B / interleaved / ZB-H1 at M = 8P and GPipe vs 1F1B over M, and
the collective-permute bytes read off the compiled HLO against `costs.expected_ppermute_bytes`.
"""

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import ModelConfig, OptimizerConfig, PipelineConfig
from jaxpar.models.llama import Transformer
from jaxpar.parallel import analysis, pipeline, schedules
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import (
    build as build_lib,
    costs,
    optimizer as optimizer_lib,
    pipeline as pipeline_lm,
    step as step_lib,
)

# Big enough that activations, not weights, decide the memory; small enough to compile in seconds.
MODEL = ModelConfig(
    vocab_size=2048, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768, max_seq_len=4096
)
MESH = {"pipeline": 4, "data": 2}
DEVICES = math.prod(MESH.values())  # the simulated CPU devices part 3 compiles for
PLOT_P, PLOT_M = 4, 8
UNIT_COSTS = {"fused": {"F": 1.0, "B": 2.0}, "split": {"F": 1.0, "B": 1.0, "W": 1.0}}


def variants():
    """(label, schedule name, V, split_backward) of every schedule drawn and measured: the four of the
    issue first, then looped GPipe and the split-backward variants (W right after B)."""
    return [
        ("gpipe", "gpipe", 1, False),
        ("1f1b", "1f1b", 1, False),
        ("interleaved_1f1b_v2", "interleaved_1f1b", 2, False),
        ("zero_bubble", "zero_bubble", 1, True),
        ("gpipe_looped_v2", "gpipe", 2, False),
        ("1f1b_split", "1f1b", 1, True),
        ("interleaved_1f1b_v2_split", "interleaved_1f1b", 2, True),
    ]


MAIN = 4  # the first MAIN variants are the issue's four schedules


# --- part 1: tables ------------------------------------------------------------------------------------


def part1(out: pathlib.Path) -> dict:
    rows = []
    for label, name, V, split in variants():
        for P in (2, 4, 8):
            for factor in (1, 2, 4, 8):
                M = factor * P
                s = schedules.make_schedule(name, P, M, V, split_backward=split)
                costs = UNIT_COSTS["split" if s.split_backward else "fused"]
                rows.append(
                    {
                        "schedule": label,
                        "P": P,
                        "V": V,
                        "M": M,
                        "ticks": s.num_ticks,
                        "bubble_table": s.bubble_fraction(),
                        "bubble_theory": schedules.theoretical_bubble(name, P, M, V, split_backward=split),
                        "bubble_lockstep_unit_costs": s.lockstep_bubble_fraction(costs),
                        "peak_in_flight": s.peak_in_flight(),
                    }
                )
    for label, name, V, split in variants():
        s = schedules.make_schedule(name, PLOT_P, PLOT_M, V, split_backward=split)
        theory = schedules.theoretical_bubble(name, PLOT_P, PLOT_M, V, split_backward=split)
        schedules.plot(
            s,
            str(out / f"timeline_{label}.png"),
            title=f"{label}: P={PLOT_P} V={V} M={PLOT_M}, bubble {s.bubble_fraction():.3f} "
            f"(theory {theory:.3f})",
        )
    plot_in_flight(out / "stash_in_flight.png", P=4, M=32)
    return {"rows": rows}


def plot_in_flight(path: pathlib.Path, P: int, M: int) -> None:
    fig, ax = common.pyplot().subplots(figsize=(7.5, 3.2))
    for label, name, V, split in variants()[:MAIN]:
        s = schedules.make_schedule(name, P, M, V, split_backward=split)
        live = np.array(s.in_flight()[0], float) / V  # in stage-equivalents (a chunk is 1/V of a stage)
        ax.step(np.arange(s.num_ticks), live, where="post", label=f"{label} (peak {live.max():g})")
    ax.set_xlabel("tick")
    ax.set_ylabel("stashed microbatches, stage 0\n(stage equivalents)")
    ax.set_title(f"Forward stashes alive on stage 0, P={P}, M={M}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    common.save_figure(fig, path, dpi=130)


# --- part 2: what each action costs --------------------------------------------------------------------


def _abstract_blocks(cfg: ModelConfig, layers: int):
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    block_graphdef, stacked = nnx.split(model.blocks)
    chunk = jax.tree.map(lambda x: jax.ShapeDtypeStruct((layers, *x.shape[1:]), x.dtype), stacked)
    return model, block_graphdef, chunk


def action_flops(cfg: ModelConfig, rows: int, seq: int, layers: int) -> dict[str, int]:
    """Matmul FLOPs of one chunk of `layers` layers for one microbatch, per action, read off compiled
    single-device programs built from the executor's own LayerVjp (ZB's B and W are its two halves of
    the backward jaxpr), and of the loss head (all of the vocabulary, forward and backward)."""
    model, block_graphdef, chunk = _abstract_blocks(cfg, layers)
    vjp = pipeline.LayerVjp(pipeline_lm.block_layer_fn(block_graphdef, cfg))
    act = jax.ShapeDtypeStruct((rows, seq, cfg.d_model), jnp.dtype(cfg.dtype))
    ids = jax.ShapeDtypeStruct((rows, seq), jnp.int32)

    def forward(x, chunk, pos, seg):
        return jax.lax.scan(lambda x, p: vjp.forward(x, p, pos, seg), x, chunk)

    residuals = jax.eval_shape(forward, act, chunk, ids, ids)[1]

    def backward(residuals, chunk, g):
        return jax.lax.scan(lambda g, xs: vjp.backward(*xs, g), g, (residuals, chunk), reverse=True)

    def layer_of(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)

    boundary = vjp.split(layer_of(residuals), layer_of(chunk), act)
    handed_over = [jax.ShapeDtypeStruct((layers, *a.shape), a.dtype) for a in boundary]

    def backward_input(residuals, chunk, g):
        return jax.lax.scan(lambda g, xs: vjp.backward_input(*xs, g), g, (residuals, chunk), reverse=True)

    def weight(residuals, chunk, handed_over):
        return jax.lax.scan(
            lambda _, xs: (None, vjp.backward_weight(*xs)), None, (residuals, chunk, handed_over)
        )[1]

    norm_graphdef, norm_state = nnx.split(model.final_norm)
    unembed = model.unembed

    def head(h, norm_state, w, targets):
        def loss(h, norm_state, w):
            x = nnx.merge(norm_graphdef, norm_state)(h)
            logits = jnp.einsum("btd,dv->btv", x, w[...], preferred_element_type=jnp.float32)
            lse = jax.nn.logsumexp(logits, -1)
            return jnp.sum(lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

        return jax.grad(loss, argnums=(0, 1, 2))(h, norm_state, w)

    def flops(fn, *args):
        return analysis.matmul_flops(jax.jit(fn).lower(*args).compile())

    return {
        "F": flops(forward, act, chunk, ids, ids),
        "B_fused": flops(backward, residuals, chunk, act),
        "B_input": flops(backward_input, residuals, chunk, act),
        "W": flops(weight, residuals, chunk, handed_over),
        "head": flops(head, act, norm_state, unembed, ids),
        "stash_slot_bytes": sum(math.prod(r.shape) * r.dtype.itemsize for r in jax.tree.leaves(residuals)),
        "weight_stash_slot_bytes": sum(math.prod(a.shape) * a.dtype.itemsize for a in handed_over),
    }


def lockstep_time(s: schedules.Schedule, costs: dict[str, float], head: float, split_head: bool) -> float:
    """Lockstep time with the loss head in the tick of the last stage's final forward: split over
    the vocabulary (every stage adds head/P to that tick) or all on the last stage."""
    P, G = s.num_stages, s.num_global_stages
    total = 0.0
    for row in s.table:
        per_stage = [costs[a.kind] if a is not None else 0.0 for a in row]
        last = row[P - 1]
        head_tick = last is not None and last.kind == "F" and s.global_stage(P - 1, last) == G - 1
        if head_tick and split_head:
            total += max(per_stage) + head / P
        else:
            if head_tick:
                per_stage[P - 1] += head
            total += max(per_stage)
    return total


def part2(seq: int, rows: int) -> dict:
    """Lockstep time of each schedule at M = 8P with the measured action costs, in units of one
    stage's forward (a chunk's forward is 1/V of it), the head split over the stages or all on the
    last stage; `ideal` is one stage's work without any bubble."""
    P = MESH["pipeline"]
    M = 8 * P
    flops_by_v = {}
    out = {}
    for label, name, V, split in variants():
        layers = MODEL.n_layers // (P * V)
        if V not in flops_by_v:
            flops_by_v[V] = action_flops(MODEL, rows, seq, layers)
        f = flops_by_v[V]
        s = schedules.make_schedule(name, P, M, V, split_backward=split)
        unit = f["F"]  # a chunk's forward
        costs = (
            {"F": 1.0, "B": f["B_input"] / unit, "W": f["W"] / unit}
            if split
            else {"F": 1.0, "B": f["B_fused"] / unit}
        )
        head = f["head"] / unit
        ideal = (M * V * sum(costs.values()) + M * head / P) / V
        t_split = lockstep_time(s, costs, head, True) / V
        t_last = lockstep_time(s, costs, head, False) / V
        out[label] = {
            "V": V,
            "split_backward": split,
            "layers_per_chunk": layers,
            "flops": f,
            "costs_relative_to_chunk_F": costs,
            "head_relative_to_chunk_F": head,
            "M": M,
            "ideal_time": ideal,
            "lockstep_time_head_split": t_split,
            "lockstep_time_head_on_last_stage": t_last,
            "bubble_lockstep_measured_costs": 1 - ideal / t_split,
        }
        print(
            f"{label:26s} costs {costs} head {head:.2f}  ideal {ideal:.1f} time split {t_split:.1f} "
            f"vs last-stage {t_last:.1f}"
        )
    return out


# --- part 3: compiled programs ---------------------------------------------------------------------------


def compiled_step(name: str, V: int, M: int, seq: int, rows: int, split: bool = False):
    sizes = dict(pipeline=MESH["pipeline"], data=MESH["data"], fsdp=1, expert=1, sequence=1, tensor=1)
    mesh = make_mesh(sizes)
    cfg = PipelineConfig(name, M, V, split)
    batch_rows = M * MESH["data"] * rows
    cfg.validate(MODEL, sizes, batch_rows)
    tx = optimizer_lib.make_optimizer(OptimizerConfig(), 10)
    graphdef, abstract, shardings = build_lib.abstract_state(MODEL, tx, mesh)
    batch_sharding = step_lib.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((batch_rows, seq), jnp.int32, sharding=batch_sharding)
        for k in step_lib.BATCH_KEYS
    }

    def fn(params, batch):
        return pipeline_lm.pipelined_loss_and_grads(
            params, graphdef, batch, mesh=mesh, pipeline_cfg=cfg, grad_shardings=shardings.params
        )[:2]

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(abstract.params, batch).compile()
    return compiled, time.perf_counter() - start, cfg.make_schedule(MESH["pipeline"])


def ppermute_report(compiled, program: pipeline.TickProgram, act_bytes: int) -> dict:
    """collective-permute bytes: per execution from the compiled HLO, executions from the table (each
    direction's ppermute sits under a cond whose predicate is the table's fwd_comm / bwd_comm)."""
    ops = [op for op in analysis.collective_ops(compiled) if op.kind == "collective-permute"]
    in_ticks = [op for op in ops if "ppermute" in op.op_name]
    per_execution = sorted({op.bytes for op in in_ticks})
    fires = int(program.fwd_comm.sum() + program.bwd_comm.sum())
    measured = per_execution[0] * fires if len(per_execution) == 1 else None
    expected = costs.expected_ppermute_bytes(program, act_bytes)
    return {
        "ops_in_tick_loop": len(in_ticks),
        "bytes_per_execution": per_execution,
        "executions": fires,
        "measured": measured,
        "expected": expected["total"],
        "useful": expected["useful"],
        "ungated_upper_bound": sum(op.total_bytes for op in in_ticks),
        "other_collective_permutes": sum(op.total_bytes for op in ops if op not in in_ticks),
    }


def pipeline_allreduce_report(compiled, program: pipeline.TickProgram, act_bytes: int, tokens: int) -> dict:
    """psum/pmax over the pipeline axis (vocab-parallel embedding and head): bytes per execution from
    the HLO, each fired once per microbatch; expected: the embedding (one activation), the head's input
    broadcast and output-gradient reduction (two), the embedding gradient broadcast (one), and three
    [rows, T] float32 statistics (max, sum-exp, target logit)."""
    ops = [
        op
        for op in analysis.collective_ops(compiled)
        if op.kind == "all-reduce"
        and "while/body" in op.op_name
        and ("psum" in op.op_name or "pmax" in op.op_name)
    ]
    M = program.schedule.microbatches
    return {
        "measured": sum(op.bytes for op in ops) * M,
        "expected": M * (4 * act_bytes + 3 * tokens * 4),
        "ops": len(ops),
    }


def part3(seq: int, rows: int) -> dict:
    P = MESH["pipeline"]
    mb_rows = MESH["data"] * rows
    act_bytes = costs.activation_bytes(MODEL, mb_rows, seq, MESH)
    runs = []
    plan = [
        (label, name, V, split, 8 * P) for label, name, V, split in variants() if label != "gpipe_looped_v2"
    ]
    plan += [
        (label, name, 1, False, factor * P)
        for label, name in (("gpipe", "gpipe"), ("1f1b", "1f1b"))
        for factor in (1, 2, 4)
    ]
    for label, name, V, split, M in plan:
        compiled, seconds, schedule = compiled_step(name, V, M, seq, rows, split)
        program = pipeline.lower(schedule)
        memory = analysis.memory(compiled)
        run = {
            "schedule": label,
            "V": V,
            "M": M,
            "compile_s": round(seconds, 1),
            "memory": memory,
            "stash_slots": program.num_stash,
            "inbox_slots": [program.num_fwd_inbox, program.num_bwd_inbox],
            "ppermute": ppermute_report(compiled, program, act_bytes),
            "pipeline_allreduce": pipeline_allreduce_report(compiled, program, act_bytes, rows * seq),
        }
        runs.append(run)
        print(
            f"{label:22s} M={M:3d} slots {program.num_stash:3d} "
            f"temp {memory['temp_bytes'] / 2**20:8.1f} MiB "
            f"peak {memory['peak_estimate'] / 2**20:8.1f} MiB ppermute {run['ppermute']['measured']} "
            f"vs {run['ppermute']['expected']} ({seconds:.0f}s)"
        )
    return {"act_bytes": act_bytes, "microbatch_rows": mb_rows, "runs": runs}


# --- report ----------------------------------------------------------------------------------------------


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def readme(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Pipeline schedules: bubble, memory, ppermute bytes",
        "",
        f"Generated by `python experiments/bench_pipeline.py` on {m['date']}: {m['cpu']}, "
        f"{m['cores']} cores, "
        f"backend {m['backend']} ({m['devices']} simulated devices); jax {m['jax']}, jaxlib {m['jaxlib']}, "
        f"flax {m['flax']}. Raw numbers: `results.json`. What they say: `FINDINGS.md`.",
        "",
        "## Timelines",
        "",
        f"P={PLOT_P}, M={PLOT_M} (stages x ticks; blue forward, orange backward, green weight gradient; "
        "later "
        "chunks lighter; the number is the microbatch). The tables are the executor's program.",
        "",
    ]
    lines += [f"![{label}](timeline_{label}.png)" for label, _, _, _ in variants()]
    lines += [
        "",
        "![stash](stash_in_flight.png)",
        "",
        "## Bubble fraction: table vs theory",
        "",
        "*Table*: idle share of the stage x tick slots of the generated table, every action one slot. "
        "*Theory*: "
        "(P-1)/(M+P-1) for GPipe and 1F1B, (P-1)/(V*M+P-1) for interleaved 1F1B and looped GPipe, "
        "(P-1)/(3M+P-1) for ZB-H1 (the ZB paper's (P-1)(T_F+T_B-T_W) with T_F = T_B = T_W). *Lockstep*: "
        "the executor runs ticks in lockstep, so a tick lasts as long as its slowest stage; with a fused "
        "backward costing 2 forwards (1F1B-family ticks mixing F and B wait for the B) and ZB's B = W = F.",
        "",
        "| schedule | P | V | M | ticks | bubble (table) | theory | lockstep, F:B:W = 1:2:- / 1:1:1 "
        "| peak stashes (stage 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["part1"]["rows"]:
        if r["P"] == 8 and r["M"] > 16:
            continue
        lines.append(
            f"| {r['schedule']} | {r['P']} | {r['V']} | {r['M']} | {r['ticks']} | "
            f"{r['bubble_table']:.4f} | {r['bubble_theory']:.4f} | "
            f"{r['bubble_lockstep_unit_costs']:.4f} | "
            f"{r['peak_in_flight'][0]} |"
        )
    if "part2" in results:
        p2 = results["part2"]
        lines += [
            "",
            "## Lockstep time with measured action costs (matmul FLOPs of compiled single-action programs)",
            "",
            f"Model: {MODEL.n_layers} layers, d_model {MODEL.d_model}, d_ff {MODEL.d_ff}, "
            f"vocab {MODEL.vocab_size}, sequence {results['seq_len']}, "
            f"{results['part3']['microbatch_rows']} rows per microbatch, P=4, M=32. "
            "Costs relative to a chunk's forward (F), read off compiled single-device programs of one chunk "
            "built from the executor's LayerVjp; B (input) and W are the two halves of the backward jaxpr. "
            "The head is the final norm + output layer + loss, forward and backward, for the whole "
            "vocabulary. Times in units of one stage's forward (all its layers): *ideal* is one stage's "
            "work with no bubble (the head split over stages); the executor's time is the sum over ticks of "
            "the slowest stage, with the head split over the stages (what pipeline.py does) or all on the "
            "last stage (the usual placement).",
            "",
            "| schedule | V | B fused / F | B input / F | W / F | head / F | ideal "
            "| lockstep time, head split | bubble | lockstep time, head on last stage |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in p2.items():
            f = r["flops"]
            lines.append(
                f"| {label} | {r['V']} | {f['B_fused'] / f['F']:.2f} | "
                f"{f['B_input'] / f['F']:.2f} | {f['W'] / f['F']:.2f} | "
                f"{r['head_relative_to_chunk_F']:.2f} | {r['ideal_time']:.1f} | "
                f"{r['lockstep_time_head_split']:.1f} | {r['bubble_lockstep_measured_costs']:.4f} | "
                f"{r['lockstep_time_head_on_last_stage']:.1f} |"
            )
    if "part3" in results:
        p3 = results["part3"]
        lines += [
            "",
            "## Per-device memory from compiled memory analysis (pipeline=4 x data=2, 8 simulated devices)",
            "",
            "The pipelined loss-and-gradient program, compiled from abstract inputs. *Stash slots*: the "
            "schedule's peak of forward stashes on a stage (chunks), which sizes the stash buffer. "
            "Temporaries are XLA:CPU's buffer assignment (MiB = 2^20 bytes).",
            "",
            "| schedule | V | M | stash slots | temporaries (MiB) | peak estimate (MiB) | compile (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in p3["runs"]:
            lines.append(
                f"| {r['schedule']} | {r['V']} | {r['M']} | {r['stash_slots']} | "
                f"{_mib(r['memory']['temp_bytes'])} | {_mib(r['memory']['peak_estimate'])} | "
                f"{r['compile_s']} |"
            )
        gpipe = {r["M"]: r["memory"]["temp_bytes"] for r in p3["runs"] if r["schedule"] == "gpipe"}
        if len(gpipe) > 1:
            lo, hi = min(gpipe), max(gpipe)
            per_slot = (gpipe[hi] - gpipe[lo]) / (hi - lo)
            lines += [
                "",
                f"GPipe's temporaries grow by {_mib(per_slot)} MiB per microbatch "
                f"(M={lo} to {hi}); "
                f"1F1B's stay flat because its stash has P slots whatever M is.",
            ]
        lines += [
            "",
            "## ppermute bytes per step (per device) vs the analytic count",
            "",
            f"One ppermute moves one microbatch activation per device ({p3['act_bytes']:,} bytes: "
            f"{p3['microbatch_rows']} rows split over data=2, x {results['seq_len']} x {MODEL.d_model} "
            "x 4 bytes). "
            "*Measured*: bytes "
            "per execution read off the compiled HLO (the tick loop holds one forward and one backward "
            "ppermute) times the ticks whose cond fires them (the table's fwd_comm / bwd_comm). *Expected*: "
            "`costs.expected_ppermute_bytes` (one buffer per direction per tick in which any stage "
            "sends). "
            "*Useful*: what must move at least, 2 M (G-1) activations over P devices. *Ungated*: what the "
            "loop would move with a ppermute in every tick. *Pipeline all-reduce*: the vocabulary-parallel "
            "embedding and head (4 activations + 3 [rows, T] statistics per microbatch).",
            "",
            "| schedule | V | M | measured | expected | measured / expected | useful | ungated "
            "| pipeline all-reduce measured / expected |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in p3["runs"]:
            pp, ar = r["ppermute"], r["pipeline_allreduce"]
            ratio = "-" if pp["measured"] is None else f"{pp['measured'] / pp['expected']:.3f}"
            lines.append(
                f"| {r['schedule']} | {r['V']} | {r['M']} | {_mib(pp['measured'])} | "
                f"{_mib(pp['expected'])} | "
                f"{ratio} | {_mib(pp['useful'])} | {_mib(pp['ungated_upper_bound'])} | "
                f"{_mib(ar['measured'])} / {_mib(ar['expected'])} |"
            )
    return "\n".join(lines) + "\n"


def run(out: str, seq_len: int, rows_per_shard: int, skip_compile: bool) -> None:
    """Part 1, then (unless `skip_compile`) parts 2 and 3 at sequence length `seq_len` with `rows_per_shard`
    rows per microbatch per data shard; results.json, README.md and the PNGs into `out`."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine.describe(),
        "seq_len": seq_len,
        "model": dataclasses.asdict(MODEL),
        "mesh": MESH,
    }
    results["part1"] = part1(out)
    if not skip_compile:
        results["part2"] = part2(seq_len, MESH["data"] * rows_per_shard)
        results["part3"] = part3(seq_len, rows_per_shard)
    common.write_results(out, results, default=str)
    common.write_readme(out, readme(results))
    print(f"wrote {out}/README.md")


def render(out: str) -> None:
    """README.md again from `out`/results.json; nothing measured."""
    common.write_readme(out, readme(common.read_results(out)))
