"""Sequence parallelism, measured on compiled programs (8 simulated CPU devices); the work behind
experiments/bench_sequence.py.

Part 1, bytes: collective bytes per layer per step (forward + backward) of each variant's attention
  (ring, ulysses, usp, allgather) and of LASP-2 linear attention, read off the compiled program with
  jaxpar/parallel/analysis.py, next to the analytic expectation (jaxpar.train.costs.sequence_terms),
  for sequence = 2, 4, 8. Then the same collectives counted inside the real train step of the Llama model
  (per layer), to show the model runs exactly these.
Part 2, memory: per-device memory of the compiled train step vs sequence length for sequence = 1, 2, 4, 8
  (XLA buffer assignment), and the longest sequence that fits a fixed per-device budget.
Part 3, balance: query-key pairs each device's ring computes under causal masking, contiguous vs zigzag
  layout, counted while the ring runs (a counting block function) and from the static schedule.
"""

import collections
import dataclasses
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import ModelConfig, RunConfig, TrainConfig
from jaxpar.kernels import attention as attention_lib
from jaxpar.models import linear_attention as linear_lib
from jaxpar.parallel import analysis, ring as ring_lib, sequence as seq
from jaxpar.parallel.mesh import make_mesh
from jaxpar.parallel.per_device import per_device
from jaxpar.train import build as build_lib, costs

DEVICES = 8  # the largest sequence axis measured
PARTS = ("bytes", "memory", "balance")

SEQUENCES = (2, 4, 8)
MiB = 2**20


def mesh_of(**sizes):
    return make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def packed_segments(batch: int, length: int, docs: int = 3) -> np.ndarray:
    """Rows of `docs` equal documents (segment ids 1..docs)."""
    row = np.repeat(np.arange(1, docs + 1), -(-length // docs))[:length]
    return np.broadcast_to(row, (batch, length)).astype(np.int32)


def by_kind(ops) -> dict[str, int]:
    totals = collections.Counter()
    for op in ops:
        if op.group_size > 1:  # a collective over one device moves nothing
            totals[op.kind] += op.total_bytes
    return dict(totals)


# --------------------------------------------------------------------------------------------------
# Part 1: bytes.

OP = dict(batch=1, seq_len=4096, heads=8, kv_heads=8, head_dim=64)


def op_bytes(variant: str, n: int, ulysses_degree: int = 0, zigzag: int = 1, layers: int = 2) -> dict:
    """Compile forward + backward of `layers` scanned layers of sequence-parallel attention (or LASP-2)
    on a sequence=n mesh, as the model runs them (a layer scan: forward and backward are separate loops,
    so XLA cannot share a forward collective with the backward); collective bytes per device per layer."""
    B, T, N, K, H = OP["batch"], OP["seq_len"], OP["heads"], OP["kv_heads"], OP["head_dim"]
    stack = lambda *shape: jax.ShapeDtypeStruct((layers, *shape), jnp.float32)
    q, kv, g = stack(B, T, N, H), stack(B, T, K, H), stack(B, T, K)
    seg = packed_segments(B, T)

    def layer_op(q, k, v, g):
        if variant == "lasp2":
            return linear_lib.linear_attention(q, k, v, g, seg, chunk=256, zigzag=zigzag)
        return seq.sequence_attention(
            q, k, v, segment_ids=seg, variant=variant, implementation="xla", ulysses_degree=ulysses_degree
        )

    # The output cotangent is an input: with sum(out) XLA would fold the collectives of a constant.
    def loss(ct, q, k, v, g):
        def one(total, xs):
            ct, q, k, v, g = xs
            return total + jnp.sum(ct * layer_op(q, k, v, g)), None

        return jax.lax.scan(one, jnp.zeros((), jnp.float32), (ct, q, k, v, g))[0]

    with jax.set_mesh(mesh_of(sequence=n)):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4))).lower(q, q, kv, kv, g).compile()
    ops = analysis.collective_ops(compiled)
    return {
        "measured": {k: v // layers for k, v in by_kind(ops).items()},
        "ops": [dataclasses.asdict(op) for op in ops],
    }


def expected(variant: str, n: int, ulysses_degree: int = 1, zigzag: int = 1) -> list:
    return costs.sequence_terms(
        variant,
        batch=OP["batch"],
        seq_len=OP["seq_len"],
        sequence=n,
        heads=OP["heads"],
        kv_heads=OP["kv_heads"],
        head_dim=OP["head_dim"],
        ulysses_degree=ulysses_degree,
        zigzag=zigzag,
    )


def part_bytes() -> dict:
    rows = []
    for n in SEQUENCES:
        for name, variant, degree, zigzag in (
            ("ring", "ring", 0, n),
            ("ulysses", "ulysses", 0, 1),
            ("usp (ulysses 2 x ring n/2)", "usp", 2, n // 2),
            ("allgather", "allgather", 0, n),
            ("lasp2 (contiguous)", "lasp2", 0, 1),
            ("lasp2 (zigzag)", "lasp2", 0, n),
        ):
            t0 = time.time()
            got = op_bytes(variant, n, degree, zigzag)
            terms = expected(variant, n, degree or 1, zigzag)
            want = collections.Counter()
            for _, kind, nbytes in terms:
                want[kind] += nbytes
            rows.append(
                {
                    "variant": name,
                    "sequence": n,
                    "measured": got["measured"],
                    "expected": dict(want),
                    "terms": terms,
                    "ops": got["ops"],
                    "compile_s": round(time.time() - t0, 1),
                }
            )
            print(
                f"bytes {name:28s} n={n}: measured {sum(got['measured'].values()) / MiB:8.3f} MiB, "
                f"expected {sum(want.values()) / MiB:8.3f} MiB",
                flush=True,
            )
    return {"shapes": OP, "rows": rows, "model": part_bytes_in_model()}


MODEL = dict(vocab_size=256, d_model=256, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=32, d_ff=768)


def train_step(model: ModelConfig, mesh, seq_len: int, batch: int = 1):
    # Every other section at its defaults (the mesh section is not read: the mesh is passed).
    run = RunConfig(model=model, train=TrainConfig(global_batch=batch, seq_len=seq_len))
    return build_lib.build(run, mesh).compile()


def part_bytes_in_model() -> list:
    """The sequence-parallel collectives of the real train step (ops from the attention's shard_map,
    per layer), sequence=4, next to the op-level measurement at the same shapes."""
    rows = []
    n, T = 4, 4096
    for variant, mixer in (
        ("ring", "softmax"),
        ("ulysses", "softmax"),
        ("usp", "softmax"),
        ("allgather", "softmax"),
        ("ring", "linear"),
    ):
        model = ModelConfig(
            **MODEL, sequence_parallel=variant, mixer=mixer, ulysses_degree=2, linear_chunk=256
        )
        compiled = train_step(model, mesh_of(sequence=n), T)
        ops = [op for op in analysis.collective_ops(compiled) if "shard_map" in op.op_name]
        per_layer = {k: v // model.n_layers for k, v in by_kind(ops).items()}
        zigzag = seq.zigzag_factor(variant, n, 2, mixer=mixer)
        terms = costs.sequence_terms(
            "lasp2" if mixer == "linear" else variant,
            batch=1,
            seq_len=T,
            sequence=n,
            heads=model.n_heads,
            kv_heads=model.n_kv_heads,
            head_dim=model.head_dim,
            segment_ids=True,
            ulysses_degree=2,
            zigzag=zigzag,
        )
        want = collections.Counter()
        for _, kind, nbytes in terms:
            want[kind] += nbytes
        rows.append(
            {
                "variant": "lasp2" if mixer == "linear" else variant,
                "sequence": n,
                "seq_len": T,
                "per_layer": per_layer,
                "expected": dict(want),
            }
        )
        print(
            f"model {rows[-1]['variant']:10s}: per layer {sum(per_layer.values()) / MiB:.3f} MiB, "
            f"expected {sum(want.values()) / MiB:.3f} MiB",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Part 2: memory.

LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


def part_memory(budget_mib: float) -> dict:
    # The xla implementation switches to its blockwise path (no T x T buffer, like a flash kernel) above
    # DENSE_MAX_LOGITS; force it everywhere so that the ring's dense blocks do not mix a quadratic term in.
    attention_lib.DENSE_MAX_LOGITS = 0
    rows = []
    plans = [
        ("ring", "softmax", LENGTHS),
        ("ulysses", "softmax", (8192, 32768, 131072)),
        ("ring", "linear", (8192, 32768, 131072)),
    ]
    for variant, mixer, lengths in plans:
        name = "lasp2" if mixer == "linear" else variant
        model = ModelConfig(**MODEL, sequence_parallel=variant, mixer=mixer, linear_chunk=256)
        for n in (1, *SEQUENCES):
            for T in lengths:
                t0 = time.time()
                compiled = train_step(model, mesh_of(sequence=n), T)
                mem = analysis.memory(compiled)
                rows.append(
                    {
                        "variant": name,
                        "sequence": n,
                        "seq_len": T,
                        **mem,
                        "compile_s": round(time.time() - t0, 1),
                    }
                )
                print(
                    f"memory {name:8s} n={n} T={T:6d}: temp {mem['temp_bytes'] / MiB:9.1f} MiB, peak "
                    f"{mem['peak_estimate'] / MiB:9.1f} MiB",
                    flush=True,
                )
    return {
        "model": MODEL,
        "batch": 1,
        "rows": rows,
        "fits": fits(rows, budget_mib * MiB),
        "budget_mib": budget_mib,
    }


def fits(rows, budget: float) -> list:
    """Per variant and sequence size, the longest T whose peak stays within `budget`: interpolated
    between the measured lengths on log-log axes (a power law between neighbours; extrapolated from the
    last two points past the measured range), and the longest measured length that fits."""
    out = []
    for name in sorted({r["variant"] for r in rows}):
        for n in sorted({r["sequence"] for r in rows if r["variant"] == name}):
            pts = sorted(
                (r["seq_len"], r["peak_estimate"])
                for r in rows
                if r["variant"] == name and r["sequence"] == n
            )
            logT, logP = np.log(np.array(pts, float)).T
            i = int(np.clip(np.searchsorted(logP, np.log(budget)), 1, len(pts) - 1))
            slope = (logP[i] - logP[i - 1]) / (logT[i] - logT[i - 1])
            max_len = float(np.exp(logT[i - 1] + (np.log(budget) - logP[i - 1]) / slope))
            out.append(
                {
                    "variant": name,
                    "sequence": n,
                    "max_len": max_len,
                    "growth_exponent": float(slope),
                    "max_len_measured": max([t for t, p in pts if p <= budget], default=0),
                }
            )
    return out


# --------------------------------------------------------------------------------------------------
# Part 3: balance.


def part_balance() -> dict:
    rows = []
    B, N, K, H = 1, 2, 2, 8
    for n in SEQUENCES:
        local = 4
        T = n * local
        for zigzag in (False, True):
            counts = collections.defaultdict(float)

            def record(first, pairs, zigzag=zigzag, n=n):
                chunk = int(first) // (local // 2 if zigzag else local)
                counts[chunk if chunk < n else 2 * n - 1 - chunk] += float(pairs)

            def block(q, k, v, qs, ks, qp, kp, zigzag=zigzag, n=n):
                jax.debug.callback(record, qp[0, 0], q.shape[1] * k.shape[1])
                return attention_lib.attention(
                    q, k, v, segment_ids=(qs, ks), positions=(qp, kp), implementation="xla", return_lse=True
                )

            def local_fn(q, k, v, segment_ids, zigzag=zigzag, block=block):
                return ring_lib.ring_attention(
                    q, k, v, axis_name="sequence", segment_ids=segment_ids, zigzag=zigzag, block_fn=block
                )

            rng = np.random.default_rng(0)
            q = rng.normal(size=(B, T, N, H)).astype(np.float32)
            kv = rng.normal(size=(B, T, K, H)).astype(np.float32)
            names = ("batch", "length", "heads", None)
            # The sequence axis alone: jax's debug callbacks fail inside partial-manual shard_maps.
            mesh = jax.make_mesh(
                (n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
            )
            with jax.set_mesh(mesh):
                jax.block_until_ready(
                    per_device(
                        local_fn,
                        dict(q=q, k=kv, v=kv, segment_ids=packed_segments(B, T, 1)),
                        dict(q=names, k=names, v=names, segment_ids=("batch", "length")),
                        names,
                        batch=B,
                        heads=(N, K),
                        length_axis="sequence",
                    )
                )
            measured = [counts[r] / (local * local) for r in range(n)]
            scheduled = ring_lib.schedule_work(n, zigzag, causal=True).tolist()
            rows.append(
                {
                    "sequence": n,
                    "layout": "zigzag" if zigzag else "contiguous",
                    "blocks_measured": measured,
                    "blocks_scheduled": scheduled,
                    "max_over_mean": max(measured) / np.mean(measured),
                }
            )
            print(f"balance n={n} {rows[-1]['layout']:10s}: blocks per device {measured}", flush=True)
    return {"unit": "one (local length)^2 block of query-key pairs", "rows": rows}


# --------------------------------------------------------------------------------------------------
# Report.


def fmt(x: float) -> str:
    return f"{x / MiB:,.3f}"


def readme(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Sequence parallelism: communication, memory, balance",
        "",
        f"Generated by `python experiments/bench_sequence.py` on {machine.summary(meta)}. "
        + ("**No GPU was available for this run**: " if meta["backend"] == "cpu" else "")
        + "nothing here is a timing; every number is read "
        "off compiled XLA:CPU programs (bytes, buffer sizes) or counted while the program runs (blocks). "
        "Raw numbers and every collective op: `results.json`. Parts run on: "
        + ", ".join(
            f"{name} {results[name]['meta']['date']}"
            for name in ("bytes", "memory", "balance")
            if name in results and "meta" in results[name]
        )
        + ".",
        "",
    ]
    if "bytes" in results:
        b = results["bytes"]
        s = b["shapes"]
        lines += [
            "## 1. Collective bytes per layer per step",
            "",
            f"One attention layer, forward + backward, batch {s['batch']}, sequence length {s['seq_len']}, "
            f"{s['heads']} query and {s['kv_heads']} key/value heads of dim {s['head_dim']}, fp32, packed "
            "documents (segment ids), causal; sequence axis of size n, nothing else split. Bytes per device "
            "in the convention of `jaxpar/parallel/analysis.py` (all-gather: result; reduce-scatter, "
            "all-to-all, collective-permute: operand), MiB, measured on two scanned layers (as in the model, "
            "where forward and backward are separate loops) and divided by two. Expected: "
            "`jaxpar.train.costs.sequence_terms` "
            "(ring: K/V passed n-1 times forward and again backward, dK/dV in fp32 n times; Ulysses: four "
            "all-to-alls of 1/n of the activations forward, four backward; all-gather: K/V gathered, dK/dV "
            "reduce-scattered; LASP-2: one all-gather of the memory states forward, its reduce-scatter "
            "backward). XLA:CPU may label a reduce-scatter as all-reduce + dynamic-slice (same bytes).",
            "",
            "| variant | n | measured by kind | measured total | expected total | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            got, want = sum(r["measured"].values()), sum(r["expected"].values())
            kinds = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(r["measured"].items()))
            lines.append(
                f"| {r['variant']} | {r['sequence']} | {kinds} | {fmt(got)} | {fmt(want)} | "
                f"**{got / want:.3f}** |"
            )
        if b.get("model"):
            lines += [
                "",
                "The same collectives inside the real train step (Llama, "
                f"{MODEL['n_layers']} layers, d_model {MODEL['d_model']}, {MODEL['n_heads']} heads of "
                f"{MODEL['head_dim']}, sequence 4096, sequence=4): ops issued by the sequence-parallel "
                "shard_map, per layer. The rest of the step (parameter-gradient all-reduce over the "
                "sequence axis, as over data) is the same for every variant and left out.",
                "",
                "| variant | per layer in the train step | expected | ratio |",
                "|---|---|---|---|",
            ]
            for r in b["model"]:
                got, want = sum(r["per_layer"].values()), sum(r["expected"].values())
                lines.append(f"| {r['variant']} | {fmt(got)} | {fmt(want)} | **{got / want:.3f}** |")
        lines.append("")
    if "memory" in results:
        m = results["memory"]
        if "skipped" in m:
            lines += ["## 2. Memory", "", f"Skipped: {m['skipped']}.", ""]
        else:
            lines += [
                "## 2. Per-device memory vs sequence length",
                "",
                f"Train step of the Llama model ({m['model']['n_layers']} layers, d_model "
                f"{m['model']['d_model']}, {m['model']['n_heads']} heads of {m['model']['head_dim']}, d_ff "
                f"{m['model']['d_ff']}), batch 1, fp32, remat none, attention `xla` forced onto its "
                "blockwise path (no T x T buffer, like the flash kernel); mesh = sequence axis only. Peak = "
                "arguments + outputs + temporaries - aliased, from XLA's buffer assignment (MiB).",
                "",
                "| variant | n | " + " | ".join(f"T={t}" for t in LENGTHS) + " |",
                "|---|---|" + "---|" * len(LENGTHS),
            ]
            for name in ("ring", "ulysses", "lasp2"):
                for n in (1, *SEQUENCES):
                    cells = []
                    for t in LENGTHS:
                        hit = [
                            r
                            for r in m["rows"]
                            if r["variant"] == name and r["sequence"] == n and r["seq_len"] == t
                        ]
                        cells.append(f"{hit[0]['peak_estimate'] / MiB:,.0f}" if hit else "")
                    if any(cells):
                        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
            lines += [
                "",
                f"Longest sequence within a per-device budget of {m['budget_mib']:,.0f} MiB (interpolated "
                "between measured lengths on log-log axes; the exponent is the local slope d log(peak) / "
                "d log(T): 1 = linear in T, 2 = quadratic), and the ratio to n=1 and to n=2:",
                "",
                "| variant | n | longest T | x vs n=1 | x vs n=2 | exponent | longest measured that fits |",
                "|---|---|---|---|---|---|---|",
            ]
            for f in m["fits"]:
                base = {g["sequence"]: g["max_len"] for g in m["fits"] if g["variant"] == f["variant"]}
                lines.append(
                    f"| {f['variant']} | {f['sequence']} | {f['max_len']:,.0f} | "
                    f"{f['max_len'] / base[1]:.2f} | {f['max_len'] / base[2]:.2f} | "
                    f"{f['growth_exponent']:.2f} | {f['max_len_measured']:,} |"
                )
            lines.append("")
    if "balance" in results:
        lines += [
            "## 3. Work balance under causal masking",
            "",
            "Query-key blocks of (local length)^2 each device's ring computes in the forward pass, counted "
            "while it runs (a counting block function), and the static schedule it follows. A step takes "
            "as long as its busiest device.",
            "",
            "| n | layout | blocks per device (measured) | scheduled | busiest / mean |",
            "|---|---|---|---|---|",
        ]
        for r in results["balance"]["rows"]:
            lines.append(
                f"| {r['sequence']} | {r['layout']} | {r['blocks_measured']} | "
                f"{r['blocks_scheduled']} | {r['max_over_mean']:.2f} |"
            )
        lines.append("")
    lines += [
        "## Notes",
        "",
        "- Ring bytes: K/V cross the ring n-1 times forward and n-1 times again backward (the backward "
        "re-rotates them instead of keeping every block), dK/dV n times in fp32 (the last hop brings them "
        "home). The kv segment ids travel with K/V; XLA hoists the forward and backward copies of these "
        "loop-invariant rotations out of the layer loop, so they are counted a little under the model.",
        "- Op-level bytes are measured on two scanned layers, as in the model: with forward and backward "
        "in one straight-line program XLA merges the backward's first K/V rotation with the forward's "
        "(common-subexpression elimination) and keeps the block alive instead, which the model never does.",
        "- Ulysses moves 1/n of every activation per all-to-all, so its bytes fall as 1/n; the ring's grow "
        "towards 2x(K+V) per direction, independent of n. LASP-2 moves states (K x H x H per piece), "
        "independent of the sequence length.",
        "- Memory: every variant's peak grows about linearly in T (exponents above), so the longest "
        "sequence in a fixed budget grows about n-fold: the ring keeps its own shard plus the K/V block in "
        "flight, Ulysses holds the whole sequence but for 1/n of the heads, LASP-2 its shard plus n small "
        "states. LASP-2's chunk step is rematerialised: its [chunk x chunk] decay and score tiles are "
        "recomputed in the backward instead of saved for every chunk (this roughly halved its peak when it "
        "was introduced; the rows above are with it).",
        "- TokenRing (Q forward and partial outputs back, both directions at once) was not built: per ring "
        "step its busier direction carries a Q or an O block, b t N H elements, where the ring carries K "
        "and V, 2 b t K H. That is fewer bytes only when N < 2K (at most 2 query heads per KV head): for "
        "multi-head attention it halves the critical path, for Llama-style GQA (N = 4K..8K) it doubles or "
        "quadruples it.",
        "",
    ]
    return "\n".join(lines)


def run(out: str, parts: list[str], budget_mib: float) -> None:
    """The `parts` (of PARTS; part 2 against a per-device budget of `budget_mib`), into `out`/results.json
    (parts not rerun keep their results there), README.md and memory.png."""
    out = pathlib.Path(out)
    results = {"meta": machine.describe()}
    measure = {
        "bytes": part_bytes,
        "memory": functools.partial(part_memory, budget_mib),
        "balance": part_balance,
    }
    kept = common.read_results(out, missing_ok=True)
    for name in set(measure) - set(parts):  # they keep their results, and the date and versions they ran with
        if name in kept:
            results[name] = {**kept[name], "meta": kept[name].get("meta", kept["meta"])}
    for name in parts:
        results[name] = {**measure[name](), "meta": results["meta"]}
        common.write_results(out, results, default=float)
    common.write_results(out, results, default=float)  # the meta README names
    write_report(results, out)
    print(f"wrote {out / 'results.json'}, {out / 'README.md'} and {out / 'memory.png'}")


def render(out: str) -> None:
    """README.md and memory.png again from `out`/results.json; nothing measured."""
    write_report(common.read_results(out), pathlib.Path(out))


def write_report(results: dict, out: pathlib.Path) -> None:
    """README.md and memory.png."""
    common.write_readme(out, readme(results))
    if "memory" in results:
        plot_memory(results["memory"], out / "memory.png")


def plot_memory(memory: dict, path: pathlib.Path) -> None:
    names = sorted({r["variant"] for r in memory["rows"]})
    fig, axes = common.pyplot().subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        for n in sorted({r["sequence"] for r in memory["rows"]}):
            pts = sorted(
                (r["seq_len"], r["peak_estimate"] / MiB)
                for r in memory["rows"]
                if r["variant"] == name and r["sequence"] == n
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"sequence={n}")
        ax.axhline(memory["budget_mib"], color="gray", linestyle="--", linewidth=1, label="budget")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=name)
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("peak memory per device (MiB)")
    fig.suptitle("Train step memory per device vs sequence length (compiled, XLA:CPU)")
    common.save_figure(fig, path, dpi=120)
